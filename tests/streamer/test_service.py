"""The streamer process against real NATS and Redis: replay, clocked runs, REST, alpaca-py, Polygon feed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import numpy as np
import pandas as pd
import pytest
from redis import Redis

from papertrade import keys
from papertrade.bars import aggregate, generate
from papertrade.bars.client import StreamerError, history
from papertrade.bars.encode import payloads
from papertrade.codec import decode
from papertrade.enums import Interval
from papertrade.models import Bar
from papertrade.stack.infra import Endpoints
from papertrade.stack.launch import launch
from papertrade.stack.procs import ManagedProcess
from papertrade.timeutil import parse_time, utcnow
from tests.conftest import ADMIN_TOKEN
from tests.streamer.fake_polygon import GOOD_KEY, FakePolygon

SEED = 11
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _start(infra: Endpoints, log_dir: Path, **env: str) -> tuple[ManagedProcess, str]:
    base = {**infra.env(), "PAPERTRADE_ADMIN_TOKEN": ADMIN_TOKEN, "STREAMER_SEED": str(SEED), **env}
    return launch("streamer", base, log_dir)


def _wait_status(url: str, wanted: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = httpx.get(f"{url}/v1/status").json()
        if st["status"] == wanted:
            return st
        time.sleep(0.1)
    raise AssertionError(f"status never became {wanted}: {st}")


class Received:
    """Every md.bar.> message, collected by a NATS subscriber on its own event loop in a thread."""

    def __init__(self, url: str, subject: str = "md.bar.>") -> None:
        self.msgs: list[tuple[str, bytes]] = []
        self._loop = asyncio.new_event_loop()
        self._url, self._subject = url, subject
        import threading

        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result(10)

    async def _connect(self) -> None:
        self.nc = await nats.connect(self._url)

        async def cb(msg: Any) -> None:
            self.msgs.append((msg.subject, msg.data))

        await self.nc.subscribe(
            self._subject, cb=cb, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30
        )
        await self.nc.flush()

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.msgs) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.nc.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def replayed(
    infra: Endpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Received, dict[str, Any]]]:
    """A streamer that replayed 2024-03-04..06 of AAPL and @BTCUSD as fast as possible, and what it sent."""
    rx = Received(infra.nats_url)
    proc, url = _start(
        infra,
        tmp_path_factory.mktemp("replay"),
        STREAMER_MODE="replay",
        STREAMER_SYMBOLS="AAPL,@BTCUSD",
        STREAMER_START="2024-03-04T00:00:00Z",
        STREAMER_END="2024-03-06T00:00:00Z",
    )
    try:
        st = _wait_status(url, "finished")
        rx.wait_for(st["published"])
        yield url, rx, st
    finally:
        rx.close()
        proc.stop()


def _expected(symbol: str, interval: Interval, hours: str = "regular") -> list[bytes]:
    base = generate(
        symbol, datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 5, 23, 59, tzinfo=UTC), seed=SEED
    )
    return payloads(aggregate(base, interval, hours=hours))


def test_replay_publishes_every_bar_of_every_interval_once(
    replayed: tuple[str, Received, dict[str, Any]],
) -> None:
    _, rx, st = replayed
    subjects = [s for s, _ in rx.msgs]
    assert len(rx.msgs) == st["published"]
    # AAPL: 2 sessions x 390 minutes; @BTCUSD: 2 x 1440
    assert subjects.count("md.bar.1m.AAPL") == 780 and subjects.count("md.bar.1m.@BTCUSD") == 2880
    assert subjects.count("md.bar.1d.AAPL") == 2 and subjects.count("md.bar.1h.@BTCUSD") == 48
    for symbol in ("AAPL", "@BTCUSD"):
        for interval in (Interval.M1, Interval.M5, Interval.H1, Interval.D1):
            got = [d for s, d in rx.msgs if s == f"md.bar.{interval.value}.{symbol}"]
            want = _expected(symbol, interval)
            if interval is Interval.D1 and symbol == "@BTCUSD":
                # the New York days 03-03 and 03-04 close (05:00Z) inside the run, whole; 03-05 does not
                base = generate(
                    symbol,
                    datetime(2024, 3, 3, 5, tzinfo=UTC),
                    datetime(2024, 3, 5, 4, 59, tzinfo=UTC),
                    seed=SEED,
                )
                want = payloads(aggregate(base, Interval.D1))
            assert got == want, (symbol, interval)
    bar = decode(rx.msgs[0][1], Bar)
    assert bar.symbol in ("AAPL", "@BTCUSD") and bar.t.tzinfo is not None


def test_bars_arrive_in_time_order_finer_intervals_first(
    replayed: tuple[str, Received, dict[str, Any]],
) -> None:
    _, rx, _ = replayed
    rank = {iv.value: i for i, iv in enumerate(Interval)}
    closes = []
    for subject, data in rx.msgs:
        b = msgspec.json.decode(data)
        iv = Interval(subject.split(".")[2])
        t = datetime.fromisoformat(b["t"].replace("Z", "+00:00")).timestamp()
        closes.append((t + iv.seconds if iv is not Interval.D1 else 0, rank[iv.value]))
    intraday = [c for c in closes if c[0]]
    assert intraday == sorted(intraday)


def test_redis_holds_the_latest_bars_clock_and_watchlist(
    infra: Endpoints, replayed: tuple[str, Received, dict[str, Any]]
) -> None:
    url, rx, _ = replayed
    r = Redis.from_url(infra.redis_url)
    try:
        last_1m = [d for s, d in rx.msgs if s == "md.bar.1m.@BTCUSD"][-1]
        assert r.get(keys.latest_bar("1m", "@BTCUSD")) == last_1m
        assert r.get(keys.latest_bar("1d", "AAPL")) == [d for s, d in rx.msgs if s == "md.bar.1d.AAPL"][-1]
        clock = msgspec.json.decode(r.get(keys.CLOCK) or b"{}")
        wall = clock.pop("wall")
        assert clock == {
            "timestamp": "2024-03-06T00:00:00Z",
            "is_open": False,
            "next_open": "2024-03-06T14:30:00Z",
            "next_close": "2024-03-06T21:00:00Z",
            "speed": 0.0,  # a finished replay's clock stands still
        }
        assert parse_time(wall) <= utcnow()
        assert msgspec.json.decode(r.get(keys.WATCHLIST) or b"{}")["symbols"] == ["AAPL", "@BTCUSD"]
    finally:
        r.close()
    served = httpx.get(f"{url}/v1/clock").json()
    assert parse_time(served.pop("wall")) >= parse_time(wall) and served == clock
    assert httpx.get(f"{url}/v1/latest/@BTCUSD").content == last_1m


def test_the_md_stream_keeps_a_history_for_late_subscribers(
    infra: Endpoints, replayed: tuple[str, Received, dict[str, Any]]
) -> None:
    async def first_bar() -> bytes:
        nc = await nats.connect(infra.nats_url)
        try:
            js = nc.jetstream()
            sub = await js.subscribe("md.bar.1d.AAPL", ordered_consumer=True)
            msg = await sub.next_msg(timeout=10)
            return bytes(msg.data)
        finally:
            await nc.close()

    _, rx, _ = replayed
    assert asyncio.run(first_bar()) == next(d for s, d in rx.msgs if s == "md.bar.1d.AAPL")


def test_rest_bars_are_inclusive_ascending_and_limited(
    replayed: tuple[str, Received, dict[str, Any]],
) -> None:
    url, rx, _ = replayed
    with httpx.Client(base_url=url) as c:
        rows = c.get(
            "/v1/bars/AAPL",
            params={"interval": "5m", "start": "2024-03-04T14:30:00Z", "end": "2024-03-04T15:00:00Z"},
        ).json()
        assert (
            next(r["t"] for r in rows) == "2024-03-04T14:30:00Z" and rows[-1]["t"] == "2024-03-04T15:00:00Z"
        )
        assert len(rows) == 7
        want = msgspec.json.decode(next(d for s, d in rx.msgs if s == "md.bar.5m.AAPL"))
        assert rows[0] == {k: want[k] for k in ("t", "o", "h", "l", "c", "v")}
        limited = c.get(
            "/v1/bars/AAPL", params={"interval": "1m", "start": "2024-03-04T00:00:00Z", "limit": 3}
        ).json()
        assert [r["t"] for r in limited] == [
            "2024-03-04T14:30:00Z",
            "2024-03-04T14:31:00Z",
            "2024-03-04T14:32:00Z",
        ]
        # without a start: the last `limit` bars up to the clock (2024-03-06T00:00Z)
        last = c.get("/v1/bars/AAPL", params={"interval": "1d", "limit": 5}).json()
        assert [r["t"] for r in last][-2:] == ["2024-03-04T05:00:00Z", "2024-03-05T05:00:00Z"]
        # 30 years back, on demand
        old = c.get("/v1/bars/MSFT", params={"interval": "1d", "start": "1996-01-02", "limit": 3}).json()
        assert len(old) == 3 and old[0]["t"].startswith("1996-01-02")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"interval": "2m"}, "unknown interval '2m'"),
        ({"start": "2024-03-05", "end": "2024-03-04"}, "is before start"),
        ({"start": "yesterday"}, "cannot parse 'yesterday'"),
        ({"end": "2024-13-45"}, "cannot parse"),
        ({"limit": 0}, "limit: must be between 1 and 10000"),
    ],
)
def test_bad_requests_are_422_with_a_message(
    replayed: tuple[str, Received, dict[str, Any]], params: dict[str, Any], message: str
) -> None:
    url, _, _ = replayed
    r = httpx.get(f"{url}/v1/bars/AAPL", params=params)
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"code", "message"} and body["code"] == 42210000 and message in body["message"]
    r = httpx.get(f"{url}/v2/stocks/bars", params={"symbols": "AAPL", "timeframe": "7Min"})
    assert r.status_code == 422 and "unknown interval" in r.json()["message"]
    assert httpx.get(f"{url}/v1/bars/a%20b").status_code == 422


def test_the_watchlist_is_admin_to_change(
    replayed: tuple[str, Received, dict[str, Any]], infra: Endpoints
) -> None:
    url, _, _ = replayed
    with httpx.Client(base_url=url) as c:
        assert c.get("/v1/watchlist").json()["symbols"] == ["AAPL", "@BTCUSD"]
        assert c.put("/v1/watchlist", json={"symbols": ["SPY"]}).status_code == 401
        bad = c.put("/v1/watchlist", json={"symbols": ["not a symbol"]}, headers=ADMIN)
        assert bad.status_code == 422 and "symbols[0]" in bad.json()["message"]
        ok = c.put(
            "/v1/watchlist",
            json={"symbols": ["aapl", "SPY", "@BTCUSD"], "intervals": ["1m", "1Day"]},
            headers=ADMIN,
        )
        assert ok.json() == {"symbols": ["AAPL", "SPY", "@BTCUSD"], "intervals": ["1m", "1d"]}
        assert c.get("/v1/watchlist").json() == ok.json()
    r = Redis.from_url(infra.redis_url)
    try:
        assert msgspec.json.decode(r.get(keys.WATCHLIST) or b"{}") == ok.json()
    finally:
        r.close()


def test_alpaca_py_reads_bars_with_paging(replayed: tuple[str, Received, dict[str, Any]]) -> None:
    from alpaca.data.historical import StockHistoricalDataClient
    from alpaca.data.requests import StockBarsRequest
    from alpaca.data.timeframe import TimeFrame, TimeFrameUnit

    url, _, _ = replayed
    client = StockHistoricalDataClient("key", "secret", url_override=url)
    day = client.get_stock_bars(
        StockBarsRequest(
            symbol_or_symbols=["AAPL", "MSFT"],
            timeframe=TimeFrame.Day,
            start=datetime(2024, 2, 1, tzinfo=UTC),
            end=datetime(2024, 3, 5, tzinfo=UTC),
        )
    )
    aapl = day.data["AAPL"]
    assert len(aapl) == 22 and len(day.data["MSFT"]) == 22  # Feb 2024 (Presidents' Day off) + Mar 1, 4
    want = aggregate(
        generate(
            "AAPL", datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 4, 23, 59, tzinfo=UTC), seed=SEED
        ),
        Interval.D1,
    )
    assert aapl[-1].timestamp == datetime(2024, 3, 4, 5, 0, tzinfo=UTC) and aapl[-1].close == float(want.c[0])
    assert aapl[-1].volume == float(want.v[0]) and aapl[-1].vwap is not None and aapl[-1].trade_count
    # more than one page: 10,000 per request, 2 symbols x ~25 sessions x 390 minutes
    minutes = client.get_stock_bars(
        StockBarsRequest(
            symbol_or_symbols=["AAPL", "SPY"],
            timeframe=TimeFrame(1, TimeFrameUnit.Minute),
            start=datetime(2024, 1, 29, tzinfo=UTC),
            end=datetime(2024, 3, 5, tzinfo=UTC),
        )
    )
    assert len(minutes.data["AAPL"]) == 25 * 390 and len(minutes.data["SPY"]) == 25 * 390
    ts = [b.timestamp for b in minutes.data["SPY"]]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    limited = client.get_stock_bars(
        StockBarsRequest(
            symbol_or_symbols="AAPL",
            timeframe=TimeFrame.Hour,
            start=datetime(2024, 3, 4, tzinfo=UTC),
            limit=4,
        )
    )
    assert len(limited.data["AAPL"]) == 4
    df = limited.df
    assert list(df.columns)[:5] == ["open", "high", "low", "close", "volume"]


def test_the_python_client_returns_the_dataframe_rule(replayed: tuple[str, Received, dict[str, Any]]) -> None:
    url, _, _ = replayed
    df = history(url, ["AAPL", "@BTCUSD"], "1h", start="2024-03-04T00:00:00Z", end="2024-03-04T23:00:00Z")
    assert isinstance(df.columns, pd.MultiIndex) and list(df["AAPL"].columns) == [
        "open",
        "high",
        "low",
        "close",
        "volume",
    ]
    assert str(df.index.tz) == "UTC" and df.index.is_monotonic_increasing
    assert len(df) == 24 and df["AAPL"]["close"].notna().sum() == 7
    want = aggregate(
        generate(
            "@BTCUSD", datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 4, 23, 59, tzinfo=UTC), seed=SEED
        ),
        Interval.H1,
    )
    assert np.array_equal(df["@BTCUSD"]["close"].to_numpy(), want.c)
    with pytest.raises(StreamerError, match="is before start"):
        history(url, "AAPL", "1m", start="2024-03-05T00:00:00Z", end="2024-03-04T00:00:00Z")


def test_an_admin_run_restarts_a_replay(replayed: tuple[str, Received, dict[str, Any]]) -> None:
    url, _, _ = replayed
    assert httpx.post(f"{url}/admin/run", json={"mode": "replay"}).status_code == 401
    r = httpx.post(
        f"{url}/admin/run", json={"mode": "replay", "start": "2024-03-07", "end": "2024-03-06"}, headers=ADMIN
    )
    assert r.status_code == 422
    r = httpx.post(
        f"{url}/admin/run",
        json={"mode": "replay", "start": "2024-03-07T00:00:00Z", "end": "2024-03-08T00:00:00Z"},
        headers=ADMIN,
    )
    assert r.status_code == 202
    st = _wait_status(url, "finished")
    assert st["clock"] == "2024-03-08T00:00:00Z" and st["published"] > 0


def test_realtime_publishes_each_bar_as_its_minute_closes(infra: Endpoints, tmp_path: Path) -> None:
    rx = Received(infra.nats_url, "md.bar.1m.>")
    # the simulation starts 3 s before 15:01:00: the 15:00 bar closes about 3 s after the run starts
    proc, url = _start(
        infra,
        tmp_path,
        STREAMER_MODE="realtime",
        STREAMER_SYMBOLS="AAPL",
        STREAMER_INTERVALS="1m",
        STREAMER_START="2024-03-04T15:00:57Z",
    )
    try:
        rx.wait_for(1, timeout=20)
        assert [s for s, _ in rx.msgs] == ["md.bar.1m.AAPL"]
        assert msgspec.json.decode(rx.msgs[0][1])["t"] == "2024-03-04T15:00:00Z"
        clock = httpx.get(f"{url}/v1/clock").json()
        now = datetime.fromisoformat(clock["timestamp"].replace("Z", "+00:00"))
        assert datetime(2024, 3, 4, 15, 1, tzinfo=UTC) <= now < datetime(2024, 3, 4, 15, 2, tzinfo=UTC)
        assert clock["is_open"] is True
    finally:
        rx.close()
        proc.stop()


def test_a_clocked_run_puts_the_bars_closed_before_its_start_in_redis(
    infra: Endpoints, tmp_path: Path
) -> None:
    """The latest-bar cache is filled at the run's start (not a minute later with its first bar), but
    those earlier bars are not published."""
    sym = "PR" + uuid.uuid4().hex[:5].upper().replace("0", "Q").replace("1", "R")
    proc, url = _start(
        infra,
        tmp_path,
        STREAMER_MODE="realtime",
        STREAMER_SYMBOLS=sym,
        STREAMER_INTERVALS="1m,5m",
        STREAMER_START="2024-03-04T15:02:05Z",  # the next 1m bar closes 55 s after the start
    )
    r = Redis.from_url(infra.redis_url)
    try:
        deadline = time.monotonic() + 30
        one = five = None
        while time.monotonic() < deadline and not (one and five):
            one, five = r.get(keys.latest_bar("1m", sym)), r.get(keys.latest_bar("5m", sym))
            time.sleep(0.1)
        assert one is not None and five is not None
        assert msgspec.json.decode(one)["t"] == "2024-03-04T15:01:00Z"
        assert msgspec.json.decode(five)["t"] == "2024-03-04T14:55:00Z"
        assert httpx.get(f"{url}/v1/status").json()["published"] == 0
        assert httpx.get(f"{url}/v1/latest/{sym}").content == one
    finally:
        r.close()
        proc.stop()


def test_accelerated_runs_the_clock_n_times_faster(infra: Endpoints, tmp_path: Path) -> None:
    rx = Received(infra.nats_url, "md.bar.*.@ETHUSD")
    proc, url = _start(
        infra,
        tmp_path,
        STREAMER_MODE="accelerated",
        STREAMER_SPEED="1200",
        STREAMER_SYMBOLS="@ETHUSD",
        STREAMER_INTERVALS="1m,5m",
        STREAMER_START="2024-03-04T00:00:00Z",
    )
    try:
        rx.wait_for(30, timeout=30)
        ones = [msgspec.json.decode(d)["t"] for s, d in rx.msgs if s.startswith("md.bar.1m")]
        fives = [msgspec.json.decode(d)["t"] for s, d in rx.msgs if s.startswith("md.bar.5m")]
        assert ones[:6] == [f"2024-03-04T00:0{i}:00Z" for i in range(6)]
        assert fives[0] == "2024-03-04T00:00:00Z"
        assert httpx.get(f"{url}/v1/clock").json()["timestamp"] > "2024-03-04T00:20:00Z"
        # adding a symbol takes effect at once, without waiting for the next day's chunk
        n = len(rx.msgs)
        rx2 = Received(infra.nats_url, "md.bar.1m.@SOLUSD")
        try:
            httpx.put(
                f"{url}/v1/watchlist", json={"symbols": ["@ETHUSD", "@SOLUSD"]}, headers=ADMIN
            ).raise_for_status()
            rx2.wait_for(3, timeout=20)
            assert len(rx2.msgs) >= 3 and len(rx.msgs) > n
        finally:
            rx2.close()
    finally:
        rx.close()
        proc.stop()


def test_the_polygon_feed_serves_history(infra: Endpoints, tmp_path: Path) -> None:
    with FakePolygon().running() as fake:
        proc, url = _start(
            infra,
            tmp_path,
            STREAMER_FEED="polygon",
            POLYGON_BASE_URL=fake.url,
            POLYGON_API_KEY=GOOD_KEY,
            STREAMER_AUTOSTART="false",
            STREAMER_START="2024-03-05T00:00:00Z",
        )
        try:
            rows = httpx.get(
                f"{url}/v1/bars/AAPL", params={"start": "2024-03-04T14:30:00Z", "end": "2024-03-04T14:40:00Z"}
            ).json()
            assert [r["t"] for r in rows] == [f"2024-03-04T14:3{i}:00Z" for i in range(5)]
            assert rows[0]["c"] == "175"
        finally:
            proc.stop()
    bad = FakePolygon()
    with bad.running():
        proc, url = _start(
            infra,
            tmp_path / "bad",
            STREAMER_FEED="polygon",
            POLYGON_BASE_URL=bad.url,
            POLYGON_API_KEY="wrong",
            STREAMER_AUTOSTART="false",
            STREAMER_START="2024-03-05T00:00:00Z",
        )
        try:
            r = httpx.get(
                f"{url}/v1/bars/AAPL", params={"start": "2024-03-04T14:30:00Z", "end": "2024-03-04T14:40:00Z"}
            )
            assert r.status_code == 502 and "Unknown API Key" in r.json()["message"]
        finally:
            proc.stop()


def test_the_replay_feed_serves_and_publishes_the_real_files(
    infra: Endpoints, tmp_path: Path, shared_data: Path
) -> None:
    rx = Received(infra.nats_url, "md.bar.*.ORCL")
    files = f"ORCL={shared_data / 'orcl-1995-2014.txt'},FDAX={shared_data / '2006-01-02-volume-min-001.txt'}"
    proc, url = _start(
        infra,
        tmp_path,
        STREAMER_FEED="replay",
        STREAMER_REPLAY_FILES=files,
        STREAMER_REPLAY_TZ="Europe/Berlin",
        STREAMER_REPLAY_STAMP="close",
        STREAMER_HOURS="24/7",
        STREAMER_MODE="replay",
        STREAMER_START="2014-06-01T00:00:00Z",
        STREAMER_END="2015-01-02T00:00:00Z",  # the 2014-12-31 bar closes at 2015-01-01T05:00Z
    )
    try:
        st = _wait_status(url, "finished")
        assert st["watchlist"]["symbols"] == ["FDAX", "ORCL"]
        rx.wait_for(149)
        ones = [msgspec.json.decode(d) for s, d in rx.msgs if s == "md.bar.1d.ORCL"]
        assert len(ones) == 149  # sessions from 2014-06-02 to 2014-12-31
        assert ones[-1] == {
            "symbol": "ORCL",
            "interval": "1d",
            "t": "2014-12-31T05:00:00Z",
            "o": "45.450001",
            "h": "45.560001",
            "l": "44.970001",
            "c": "44.970001",
            "v": "13269200",
        }
        assert all(s == "md.bar.1d.ORCL" for s, _ in rx.msgs), "a daily file has no intraday bars"
        with httpx.Client(base_url=url) as c:
            first = c.get(
                "/v1/bars/ORCL", params={"interval": "1d", "start": "1995-01-01", "limit": 1}
            ).json()
            assert first == [
                {
                    "t": "1995-01-03T05:00:00Z",
                    "o": "2.179012",
                    "h": "2.191358",
                    "l": "2.117284",
                    "c": "2.117284",
                    "v": "36301200",
                }
            ]
            fdax = c.get(
                "/v1/bars/FDAX", params={"interval": "5m", "start": "2006-01-02T08:00:00Z", "limit": 2}
            ).json()
            assert fdax[0] == {
                "t": "2006-01-02T08:00:00Z",
                "o": "3602",
                "h": "3603",
                "l": "3596",
                "c": "3598",
                "v": "9287",
            }
            r = c.get("/v1/bars/ORCL", params={"interval": "1h"})
            assert r.status_code == 422 and "ORCL has 1d bars" in r.json()["message"]
            missing = c.get("/v1/bars/MSFT")
            assert missing.status_code == 404 and "has FDAX, ORCL" in missing.json()["message"]
    finally:
        rx.close()
        proc.stop()
