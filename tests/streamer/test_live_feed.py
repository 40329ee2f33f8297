"""A live feed (Polygon) grows while the day runs: the real-time loop must fetch the day again."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from papertrade.bars.series import NS_PER_S, BarSeries, dt_to_ns
from papertrade.enums import Interval
from papertrade_streamer.engine import Engine, RunSpec, Watchlist
from papertrade_streamer.feeds import SyntheticFeed

MINUTE = 60 * NS_PER_S
START = dt_to_ns(datetime(2024, 1, 3, tzinfo=UTC))


class _GrowingFeed:
    """Synthetic bars, but only those that have 'arrived' (open time before `available_ns`)."""

    name = "growing"
    hours = "24/7"
    live = True

    def __init__(self, available_ns: int) -> None:
        self.inner = SyntheticFeed(seed=7, hours="24/7")
        self.available_ns = available_ns
        self.calls = 0

    def has(self, symbol: str) -> bool:
        return True

    def base_interval(self, symbol: str) -> Interval:
        return Interval.M1

    def base_bars(self, symbol: str, start_ns: int, end_ns: int) -> BarSeries:
        self.calls += 1
        return self.inner.base_bars(symbol, start_ns, min(end_ns, self.available_ns - 1))

    def coverage(self) -> tuple[int, int] | None:
        return None


async def test_bars_that_arrive_later_in_the_day_are_published() -> None:
    feed = _GrowingFeed(available_ns=START + 5 * MINUTE)
    engine = Engine(feed, Watchlist(["@GROW"], [Interval.M1]), "24/7")
    engine.live_refresh_s = 0.05
    # 20 simulated minutes at 600x: two wall seconds; only the first 5 bars exist at the start
    engine.start_run(RunSpec("accelerated", START, START + 20 * MINUTE, speed=600))
    await asyncio.sleep(0.6)
    assert 1 <= engine.published <= 5
    feed.available_ns = START + 20 * MINUTE  # the rest of the bars arrive at the provider
    await asyncio.wait_for(engine.wait(), 15)
    assert engine.status == "finished", engine.error
    assert engine.published == 20
    assert feed.calls >= 2


async def test_a_feed_that_does_not_grow_is_fetched_once_per_day() -> None:
    feed = _GrowingFeed(available_ns=START + 20 * MINUTE)
    feed.live = False
    engine = Engine(feed, Watchlist(["@GROW"], [Interval.M1]), "24/7")
    engine.live_refresh_s = 0.05
    engine.start_run(RunSpec("accelerated", START, START + 20 * MINUTE, speed=600))
    await asyncio.wait_for(engine.wait(), 15)
    assert engine.published == 20
    assert feed.calls == 1
