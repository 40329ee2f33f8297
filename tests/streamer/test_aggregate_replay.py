"""Aggregation against bars computed by hand from the real files; replay loaders; the DataFrame rule."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest

from papertrade.bars import (
    BarSeries,
    ReplayFormatError,
    aggregate,
    empty_frame,
    generate,
    load_csv,
    load_file,
    load_parquet,
    to_frame,
    write_parquet,
)
from papertrade.bars.series import NS_PER_S, dt_to_ns
from papertrade.codec import encode
from papertrade.enums import Interval
from papertrade.errors import ValidationError

BERLIN = ZoneInfo("Europe/Berlin")
MINUTE_FILE = "2006-01-02-volume-min-001.txt"


def _raw_minute_rows(path: Path) -> list[tuple[datetime, Decimal, Decimal, Decimal, Decimal, Decimal]]:
    """The 1-minute file read with the csv module only (rows are Date,Time,O,H,L,C,V,OI; stamped at close)."""
    rows = []
    with path.open() as fh:
        reader = csv.reader(fh)
        next(reader)
        for r in reader:
            close_time = datetime.fromisoformat(f"{r[0]}T{r[1]}").replace(tzinfo=BERLIN).astimezone(UTC)
            rows.append((close_time, *(Decimal(x) for x in r[2:7])))
    return rows


def _hand_bucket(rows: list, open_utc: datetime, minutes: int) -> tuple[Decimal, ...]:
    """open/high/low/close/volume of the rows whose bar opens in [open_utc, open_utc + minutes)."""
    inside = [
        r for r in rows if open_utc.timestamp() <= r[0].timestamp() - 60 < open_utc.timestamp() + minutes * 60
    ]
    assert inside, f"no rows in the bucket at {open_utc}"
    return (
        inside[0][1],
        max(r[2] for r in inside),
        min(r[3] for r in inside),
        inside[-1][4],
        sum(r[5] for r in inside),
    )


def _bar_tuple(s: BarSeries, t: datetime) -> tuple[Decimal, ...]:
    i = int(np.searchsorted(s.t, dt_to_ns(t)))
    assert s.t[i] == dt_to_ns(t)
    b = s.bar(i)
    return (b.o, b.h, b.l, b.c, b.v)


@pytest.mark.parametrize(
    ("interval", "minutes", "opens"),
    [
        (
            Interval.M5,
            5,
            [
                datetime(2006, 1, 2, 8, 0, tzinfo=UTC),
                datetime(2006, 1, 2, 8, 55, tzinfo=UTC),
                datetime(2006, 2, 27, 20, 55, tzinfo=UTC),
            ],
        ),
        (Interval.M15, 15, [datetime(2006, 1, 3, 10, 15, tzinfo=UTC)]),
        (Interval.M30, 30, [datetime(2006, 1, 17, 13, 30, tzinfo=UTC)]),
        (Interval.H1, 60, [datetime(2006, 1, 2, 8, 0, tzinfo=UTC), datetime(2006, 2, 1, 15, 0, tzinfo=UTC)]),
    ],
)
def test_aggregation_matches_hand_computed_bars_of_the_real_minute_file(
    shared_data: Path, interval: Interval, minutes: int, opens: list[datetime]
) -> None:
    path = shared_data / MINUTE_FILE
    series = load_csv(path, "FDAX", tz="Europe/Berlin", stamp="close")
    agg = aggregate(series, interval, hours="24/7")
    rows = _raw_minute_rows(path)
    for t in opens:
        assert _bar_tuple(agg, t) == _hand_bucket(rows, t, minutes)
    assert agg.v.sum() == series.v.sum()
    assert np.all(agg.t % (interval.seconds * NS_PER_S) == 0)


def test_daily_bars_group_by_new_york_date_and_are_stamped_at_its_midnight(shared_data: Path) -> None:
    series = load_csv(shared_data / MINUTE_FILE, "FDAX", tz="Europe/Berlin", stamp="close")
    daily = aggregate(series, Interval.D1, hours="24/7")
    rows = _raw_minute_rows(shared_data / MINUTE_FILE)
    ny = ZoneInfo("America/New_York")
    day = [
        r
        for r in rows
        if (r[0] - pd.Timedelta(minutes=1)).astimezone(ny).date() == datetime(2006, 1, 4).date()
    ]
    expect = (day[0][1], max(r[2] for r in day), min(r[3] for r in day), day[-1][4], sum(r[5] for r in day))
    assert _bar_tuple(daily, datetime(2006, 1, 4, 5, 0, tzinfo=UTC)) == expect  # midnight EST = 05:00 UTC


def test_daily_bars_respect_the_session_in_regular_hours() -> None:
    # 1-minute bars of 2024-07-03 (half day, 09:30-13:00 EDT) plus a pre-market and an after-hours bar
    session = generate("AAPL", datetime(2024, 7, 3, tzinfo=UTC), datetime(2024, 7, 3, 23, 59, tzinfo=UTC))
    assert len(session) == 210
    extra_t = [
        dt_to_ns(datetime(2024, 7, 3, 12, 0, tzinfo=UTC)),
        dt_to_ns(datetime(2024, 7, 3, 18, 30, tzinfo=UTC)),
    ]
    t = np.concatenate([session.t, extra_t])
    order = np.argsort(t)
    huge = np.concatenate([session.h, [9999.0, 9999.0]])
    tiny = np.concatenate([session.l, [0.01, 0.01]])
    mixed = BarSeries(
        "AAPL",
        Interval.M1,
        t[order],
        np.concatenate([session.o, [5.0, 5.0]])[order],
        huge[order],
        tiny[order],
        np.concatenate([session.c, [5.0, 5.0]])[order],
        np.concatenate([session.v, [1e9, 1e9]])[order],
    )
    daily = aggregate(mixed, Interval.D1)
    assert len(daily) == 1
    assert daily.t[0] == dt_to_ns(datetime(2024, 7, 3, 4, 0, tzinfo=UTC))  # midnight EDT
    assert (daily.o[0], daily.c[0]) == (session.o[0], session.c[-1])
    assert daily.h[0] == session.h.max() and daily.l[0] == session.l.min()
    assert daily.v[0] == session.v.sum()
    # the same bars in 24/7 count the whole New York day
    assert aggregate(mixed, Interval.D1, hours="24/7").h[0] == 9999.0


def test_aggregation_refuses_finer_or_misaligned_targets() -> None:
    five = aggregate(
        generate("SPY", datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 5, tzinfo=UTC)), Interval.M5
    )
    with pytest.raises(ValidationError, match="cannot aggregate 5m bars into 1m"):
        aggregate(five, Interval.M1)
    assert aggregate(five, Interval.M5) is five


def test_the_real_daily_files_load(shared_data: Path) -> None:
    for name, symbol, n, first in (
        ("orcl-1995-2014.txt", "ORCL", 5036, "1995-01-03"),
        ("nvda-1999-2014.txt", "NVDA", 4012, "1999-01-22"),
        ("yhoo-1996-2014.txt", "YHOO", 4713, "1996-04-12"),
    ):
        s = load_file(shared_data / name)
        assert (s.symbol, s.interval, len(s)) == (symbol, Interval.D1, n)
        first_t = datetime.fromisoformat(first).replace(tzinfo=ZoneInfo("America/New_York"))
        assert s.t[0] == dt_to_ns(first_t)
        assert s.bar(0).o == Decimal({"ORCL": "2.179012", "NVDA": "1.750000", "YHOO": "1.052083"}[symbol])


def test_the_malformed_header_is_repaired_and_reported(shared_data: Path) -> None:
    notes: list[str] = []
    s = load_csv(shared_data / MINUTE_FILE, "FDAX", tz="Europe/Berlin", stamp="close", notes=notes)
    assert len(s) == 30889 and s.interval is Interval.M1
    assert any("Time column was inserted" in n for n in notes)
    b = s.bar(0)
    assert b.t == datetime(2006, 1, 2, 8, 0, tzinfo=UTC)  # 09:01 Berlin close -> 09:00 open -> 08:00 UTC
    assert (b.o, b.h, b.l, b.c, b.v) == (
        Decimal(3602),
        Decimal(3603),
        Decimal(3597),
        Decimal(3599),
        Decimal(5699),
    )
    five = load_csv(shared_data / "2006-min-005.txt", "FDAX", tz="Europe/Berlin", stamp="close")
    assert five.interval is Interval.M5 and len(five) == 2142


def test_what_cannot_be_loaded_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    short = tmp_path / "short.csv"
    short.write_text("Date,Open,High,Low,Close\n2024-01-02,1,2,0.5,1.5,100,7,9\n")
    with pytest.raises(
        ReplayFormatError, match=r"short.csv: the header names 5 columns .* rows have 8 fields"
    ):
        load_csv(short, "X")
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("Date,Price\n2024-01-02,1\n")
    with pytest.raises(ReplayFormatError, match="missing column"):
        load_csv(nohead, "X")
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "Date,Open,High,Low,Close,Volume\n2024-01-02,1,2,0.5,1.5,100\n2024-01-03,1,two,0.5,1.5,100\n2024-01-04,1,2,0.5,1.5,100\n"
    )
    with pytest.raises(ReplayFormatError, match="line 3"):
        load_csv(bad, "X")
    notes: list[str] = []
    ok = load_csv(bad, "X", on_bad_row="skip", notes=notes)
    assert len(ok) == 2 and "skipped 1 row" in notes[0]
    with pytest.raises(ReplayFormatError, match="no such file"):
        load_csv(tmp_path / "missing.csv", "X")
    with pytest.raises(ReplayFormatError, match="cannot tell the symbol"):
        load_csv(tmp_path / "2024-01.csv")


def test_parquet_round_trip(tmp_path: Path, shared_data: Path) -> None:
    s = load_csv(shared_data / "orcl-1995-2014.txt")
    path = tmp_path / "orcl.parquet"
    write_parquet(s, path)
    back = load_parquet(path)
    assert back.symbol == "ORCL" and back.interval is Interval.D1
    for a, b in zip(
        (s.t, s.o, s.h, s.l, s.c, s.v), (back.t, back.o, back.h, back.l, back.c, back.v), strict=True
    ):
        assert np.array_equal(a, b)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ReplayFormatError, match="not a readable Parquet file"):
        load_file(tmp_path / "junk.parquet", "X")


def test_the_dataframe_rule() -> None:
    a = generate("AAPL", datetime(2024, 3, 4, 14, 30, tzinfo=UTC), datetime(2024, 3, 4, 14, 40, tzinfo=UTC))
    b = generate(
        "@BTCUSD", datetime(2024, 3, 4, 14, 25, tzinfo=UTC), datetime(2024, 3, 4, 14, 35, tzinfo=UTC)
    )
    df = to_frame([a, b])
    assert isinstance(df.columns, pd.MultiIndex) and df.columns.names == ["symbol", "field"]
    assert list(df["AAPL"].columns) == ["open", "high", "low", "close", "volume"]
    assert isinstance(df.index, pd.DatetimeIndex) and str(df.index.tz) == "UTC"
    assert df.index.is_monotonic_increasing and df.index.is_unique
    assert len(df) == 16  # 14:25..14:40, AAPL NaN before 14:30
    assert df["AAPL"]["close"].isna().sum() == 5
    assert df[("AAPL", "close")].dtype == np.float64
    same = to_frame(a.to_bars())
    assert same.equals(to_frame(a))
    assert to_frame({"XYZ": a}).columns[0] == ("XYZ", "open")
    empty = empty_frame(["AAPL"])
    assert len(empty) == 0 and str(empty.index.tz) == "UTC" and next(iter(empty.columns)) == ("AAPL", "open")


def test_the_fast_payloads_equal_the_codec() -> None:
    from papertrade.bars.encode import payloads

    for sym in ("AAPL", "@BTCUSD"):
        s = generate(sym, datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 5, tzinfo=UTC))
        for agg in (s, aggregate(s, Interval.H1), aggregate(s, Interval.D1)):
            assert payloads(agg) == [encode(b) for b in agg.to_bars()]
    odd = np.array([1e-05, 1e16, 0.1 + 0.2, 1.0, 2.5])
    s = BarSeries("X", Interval.M1, np.arange(5, dtype=np.int64) * 60 * NS_PER_S, odd, odd, odd, odd, odd)
    assert payloads(s) == [encode(b) for b in s.to_bars()]
