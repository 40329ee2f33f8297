"""The seeded synthetic market: reproducible, valid OHLC, calendar-true, independent of history."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from papertrade.bars import BarSeries, aggregate, generate
from papertrade.bars.series import NS_PER_MIN
from papertrade.enums import Interval


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _digest(s: BarSeries) -> str:
    h = hashlib.sha256()
    for a in (s.t, s.o, s.h, s.l, s.c, s.v):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _assert_valid(s: BarSeries) -> None:
    assert np.all(np.diff(s.t) > 0), "times ascending and unique"
    assert np.all(s.t % NS_PER_MIN == 0)
    assert np.all(s.l <= np.minimum(s.o, s.c))
    assert np.all(np.maximum(s.o, s.c) <= s.h)
    assert np.all(s.l > 0)
    assert np.all(s.v > 0)
    for a in (s.o, s.h, s.l, s.c):  # on the $0.01 grid
        assert np.allclose(np.rint(a * 100) / 100, a, rtol=0, atol=1e-9)


def test_same_seed_symbol_and_minute_give_the_same_bar_whatever_the_range() -> None:
    wide = generate("AAPL", _utc(2024, 3, 1), _utc(2024, 3, 20))
    narrow = generate("AAPL", _utc(2024, 3, 12, 15, 7), _utc(2024, 3, 12, 15, 40))
    lo = int(np.searchsorted(wide.t, narrow.t[0]))
    part = wide.take(slice(lo, lo + len(narrow)))
    assert len(narrow) == 34
    for a, b in zip(
        (part.t, part.o, part.h, part.l, part.c, part.v),
        (narrow.t, narrow.o, narrow.h, narrow.l, narrow.c, narrow.v),
        strict=True,
    ):
        assert np.array_equal(a, b)


def test_a_range_30_years_back_is_generated_without_its_history() -> None:
    alone = generate("MSFT", _utc(1996, 6, 3, 14), _utc(1996, 6, 3, 16))
    assert len(alone) == 121  # 14:00..16:00 inclusive, inside the session
    wider = generate("MSFT", _utc(1996, 5, 1), _utc(1996, 6, 30))
    assert _digest(wider.between(int(alone.t[0]), int(alone.t[-1]))) == _digest(alone)
    _assert_valid(alone)


def test_determinism_across_processes() -> None:
    code = (
        "from datetime import UTC, datetime\n"
        "import hashlib, numpy as np\n"
        "from papertrade.bars import generate\n"
        "s = generate('@BTCUSD', datetime(2021, 5, 1, tzinfo=UTC), datetime(2021, 5, 9, tzinfo=UTC), seed=42)\n"
        "h = hashlib.sha256()\n"
        "[h.update(np.ascontiguousarray(a).tobytes()) for a in (s.t, s.o, s.h, s.l, s.c, s.v)]\n"
        "print(h.hexdigest())\n"
    )
    out = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    here = _digest(generate("@BTCUSD", _utc(2021, 5, 1), _utc(2021, 5, 9), seed=42))
    assert out == {here}


def test_seed_and_symbol_change_the_path() -> None:
    a = generate("AAPL", _utc(2024, 3, 4), _utc(2024, 3, 5), seed=1)
    b = generate("AAPL", _utc(2024, 3, 4), _utc(2024, 3, 5), seed=2)
    c = generate("MSFT", _utc(2024, 3, 4), _utc(2024, 3, 5), seed=1)
    assert np.array_equal(a.t, b.t)
    assert not np.array_equal(a.c, b.c)
    assert not np.array_equal(a.c / a.c[0], c.c / c.c[0])


def test_it_looks_like_a_market() -> None:
    s = generate("SPY", _utc(2023, 1, 1), _utc(2024, 1, 1))
    daily = aggregate(s, Interval.D1)
    assert 245 <= len(daily) <= 252
    r = np.diff(np.log(daily.c))
    assert 0.003 < r.std() < 0.05, "daily moves of a stock, not flat, not wild"
    assert len(np.unique(s.c)) > 1000, "prices move"
    # volatility clusters: |returns| are autocorrelated at the minute scale
    m = np.abs(np.diff(np.log(s.c)))
    assert np.corrcoef(m[:-1], m[1:])[0, 1] > 0.05
    # the intraday volume shape: the first and last half hours trade more than midday
    minutes = (s.t // NS_PER_MIN) % 1440
    first = s.v[(minutes >= 14 * 60 + 30) & (minutes < 15 * 60)].mean()
    midday = s.v[(minutes >= 17 * 60) & (minutes < 18 * 60)].mean()
    assert first > 1.5 * midday


def test_24_7_blocks_join_smoothly() -> None:
    s = generate("@BTCUSD", _utc(2024, 2, 27), _utc(2024, 3, 3))
    assert len(s) == 5 * 1440 + 1
    assert np.array_equal(s.o[1:], s.c[:-1]), "each minute opens where the last closed, across days too"


@pytest.mark.parametrize(
    ("day", "open_utc", "n"),
    [
        (date(2024, 3, 8), (14, 30), 390),  # before the DST change: 09:30 EST
        (date(2024, 3, 11), (13, 30), 390),  # after it: 09:30 EDT
        (date(2024, 11, 1), (13, 30), 390),
        (date(2024, 11, 4), (14, 30), 390),  # back to EST
        (date(2024, 11, 29), (14, 30), 210),  # day after Thanksgiving: closes 13:00
        (date(2024, 12, 24), (14, 30), 210),  # Christmas Eve half day
        (date(2024, 7, 4), None, 0),  # Independence Day
        (date(2024, 12, 25), None, 0),
        (date(2024, 3, 9), None, 0),  # Saturday
        (date(2025, 1, 9), None, 0),  # market closed for President Carter's national day of mourning
    ],
)
def test_regular_hours_follow_the_nyse_calendar(day: date, open_utc: tuple[int, int] | None, n: int) -> None:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    s = generate("AAPL", start, start + timedelta(days=1) - timedelta(minutes=1))
    assert len(s) == n
    if open_utc is not None:
        first = datetime.fromtimestamp(int(s.t[0]) // 10**9, UTC)
        assert (first.hour, first.minute) == open_utc
        assert np.all(np.diff(s.t) == NS_PER_MIN)


def test_crypto_and_24_7_trade_on_holidays() -> None:
    s = generate("@ETHUSD", _utc(2024, 12, 25), _utc(2024, 12, 25, 23, 59))
    assert len(s) == 1440
    eq = generate("AAPL", _utc(2024, 12, 25), _utc(2024, 12, 25, 23, 59), hours="24/7")
    assert len(eq) == 1440


def test_millions_of_bars_are_valid() -> None:
    _assert_valid(generate("TSLA", _utc(2012, 1, 1), _utc(2024, 12, 31)))  # ~1.2M regular-hours bars
    _assert_valid(generate("@BTCUSD", _utc(2020, 1, 1), _utc(2022, 1, 1)))  # ~1.05M 24/7 bars


@settings(max_examples=25, deadline=None)
@given(
    symbol=st.sampled_from(["AAPL", "SPY", "ZZZZ", "BRK.B", "@BTCUSD", "@DOGEUSD", "PENNY"]),
    seed=st.integers(min_value=0, max_value=2**31),
    start_min=st.integers(min_value=0, max_value=(2030 - 1996) * 365 * 1440),
    length=st.integers(min_value=1, max_value=200_000),
    hours=st.sampled_from(["regular", "24/7"]),
)
def test_any_range_gives_valid_ohlc(symbol: str, seed: int, start_min: int, length: int, hours: str) -> None:
    start = _utc(1996, 1, 1) + timedelta(minutes=start_min)
    end = start + timedelta(minutes=length)
    s = generate(symbol, start, end, seed=seed, hours=hours)
    if len(s):
        _assert_valid(s)
        assert s.t[0] >= start.timestamp() * 10**9 and s.t[-1] <= end.timestamp() * 10**9
    for interval in (Interval.M5, Interval.H1, Interval.D1):
        agg = aggregate(s, interval, hours=hours)
        if len(agg):
            assert np.all(agg.l <= np.minimum(agg.o, agg.c)) and np.all(np.maximum(agg.o, agg.c) <= agg.h)
            assert np.isclose(agg.v.sum(), s.v.sum()) or interval is Interval.D1
