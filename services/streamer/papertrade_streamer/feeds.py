"""The streamer's feeds: where 1-minute (or coarser) base bars come from, and history built from them.

Every feed answers `base_bars(symbol, start_ns, end_ns)` (bars with open time in [start, end]);
`history()` aggregates them into any coarser interval with the one aggregation function.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from papertrade.bars.aggregate import aggregate
from papertrade.bars.polygon import PolygonClient, load_api_key
from papertrade.bars.replay import load_file
from papertrade.bars.series import NS_PER_S, BarSeries, ns_to_dt
from papertrade.bars.synthetic import generate_ns
from papertrade.enums import Interval
from papertrade.errors import ValidationError
from papertrade.symbols import normalize_symbol
from papertrade_streamer.settings import StreamerSettings

#: Polygon's minute bars are final about a minute after they close; ranges ending later are not cached.
_SETTLED_NS = 120 * NS_PER_S


class UnknownSymbol(LookupError):
    """The feed has no data for this symbol."""


class Feed(Protocol):
    name: str
    hours: str
    #: True when the feed's data grows while a day runs (Polygon): the real-time loop then re-fetches
    #: the current day once it has published every bar it knew of.
    live: bool

    def has(self, symbol: str) -> bool: ...

    def base_interval(self, symbol: str) -> Interval: ...

    def base_bars(self, symbol: str, start_ns: int, end_ns: int) -> BarSeries: ...

    def coverage(self) -> tuple[int, int] | None: ...


class SyntheticFeed:
    """The seeded generator: every symbol exists, every range is generated on demand."""

    name = "synthetic"
    live = False

    def __init__(self, seed: int = 0, hours: str = "regular") -> None:
        self.seed = seed
        self.hours = hours

    def has(self, symbol: str) -> bool:
        return True

    def base_interval(self, symbol: str) -> Interval:
        return Interval.M1

    def base_bars(self, symbol: str, start_ns: int, end_ns: int) -> BarSeries:
        return generate_ns(symbol, start_ns, end_ns, seed=self.seed, hours=self.hours)

    def coverage(self) -> tuple[int, int] | None:
        return None


class ReplayFeed:
    """Bars loaded from CSV / Parquet files, one series per symbol, kept in memory."""

    name = "replay"
    live = False

    def __init__(
        self, series: dict[str, BarSeries], hours: str = "regular", notes: list[str] | None = None
    ) -> None:
        self.series = series
        self.hours = hours
        self.notes = notes or []

    @classmethod
    def from_spec(cls, spec: str, *, tz: str, stamp: str, hours: str) -> ReplayFeed:
        """`SYMBOL=path,path2,...` (a bare path takes its symbol from the file name)."""
        series: dict[str, BarSeries] = {}
        notes: list[str] = []
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            symbol: str | None = None
            if "=" in item:
                sym, _, path = item.partition("=")
                symbol = normalize_symbol(sym, "STREAMER_REPLAY_FILES")
            else:
                path = item
            s = load_file(Path(path), symbol, tz=tz, stamp=stamp, notes=notes)
            series[s.symbol] = s
        if not series:
            raise ValidationError("STREAMER_REPLAY_FILES", "the replay feed needs at least one file")
        return cls(series, hours, notes)

    def has(self, symbol: str) -> bool:
        return symbol in self.series

    def base_interval(self, symbol: str) -> Interval:
        return self._get(symbol).interval

    def base_bars(self, symbol: str, start_ns: int, end_ns: int) -> BarSeries:
        return self._get(symbol).between(start_ns, end_ns)

    def coverage(self) -> tuple[int, int] | None:
        items = [s for s in self.series.values() if len(s)]
        if not items:
            return None
        return min(int(s.t[0]) for s in items), max(int(s.t[-1]) for s in items)

    def _get(self, symbol: str) -> BarSeries:
        try:
            return self.series[symbol]
        except KeyError:
            raise UnknownSymbol(
                f"the replay feed has no data for {symbol}; it has {', '.join(sorted(self.series))}"
            ) from None


class PolygonFeed:
    """Polygon REST aggregates, fetched one New York day (or the asked range) at a time and cached."""

    name = "polygon"
    live = True

    def __init__(self, client: PolygonClient, hours: str = "regular", cache_size: int = 256) -> None:
        self.client = client
        self.hours = hours
        self._cache: OrderedDict[tuple[str, int, int], BarSeries] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def has(self, symbol: str) -> bool:
        return True

    def base_interval(self, symbol: str) -> Interval:
        return Interval.M1

    def base_bars(self, symbol: str, start_ns: int, end_ns: int) -> BarSeries:
        key = (symbol, start_ns, end_ns)
        # a range that ends after (about) now is still growing at Polygon: never serve it from cache
        settled = end_ns < time.time_ns() - _SETTLED_NS
        with self._lock:
            hit = self._cache.get(key) if settled else None
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        s = self.client.bars(symbol, Interval.M1, ns_to_dt(start_ns), ns_to_dt(end_ns))
        if not settled:
            return s
        with self._lock:
            self._cache[key] = s
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return s

    def coverage(self) -> tuple[int, int] | None:
        return None


def make_feed(settings: StreamerSettings) -> Feed:
    if settings.feed == "replay":
        return ReplayFeed.from_spec(
            settings.replay_files, tz=settings.replay_tz, stamp=settings.replay_stamp, hours=settings.hours
        )
    if settings.feed == "polygon":
        env = {"POLYGON_API_KEY": settings.polygon_api_key or ""}
        if settings.polygon_secret_file:
            env["POLYGON_SECRET_FILE"] = str(settings.polygon_secret_file)
        key = load_api_key(env)
        return PolygonFeed(PolygonClient(key, base_url=settings.polygon_base_url), settings.hours)
    return SyntheticFeed(settings.seed, settings.hours)


def history(
    feed: Feed, symbol: str, interval: Interval, start_ns: int, end_ns: int, now_ns: int | None = None
) -> BarSeries:
    """`interval` bars of `symbol` with open time in [start, end]; only minutes completed by `now`.

    The last bar of a coarser interval may be partial (the bucket `now` is in), as Alpaca's are.
    """
    if not feed.has(symbol):
        known = f"; it has {', '.join(sorted(feed.series))}" if isinstance(feed, ReplayFeed) else ""
        raise UnknownSymbol(f"no data for {symbol} in the {feed.name} feed{known}")
    base_iv = feed.base_interval(symbol)
    if interval.seconds < base_iv.seconds:
        raise ValidationError(
            "interval",
            f"{symbol} has {base_iv.value} bars in the {feed.name} feed; ask for {base_iv.value} or coarser",
        )
    span = (25 * 3600 if interval is Interval.D1 else interval.seconds) * NS_PER_S
    base_end = end_ns + span - 1
    if now_ns is not None:
        base_end = min(base_end, now_ns - base_iv.seconds * NS_PER_S)
    if base_end < start_ns:
        return BarSeries.empty(symbol, interval)
    base = feed.base_bars(symbol, start_ns, base_end)
    return aggregate(base, interval, hours=feed.hours).between(start_ns, end_ns)


def collect(
    feed: Feed,
    symbol: str,
    interval: Interval,
    start_ns: int | None,
    end_ns: int,
    limit: int,
    now_ns: int | None = None,
) -> BarSeries:
    """The first `limit` bars from `start` (or, without a start, the last `limit` up to `end`).

    Generates growing windows instead of the whole range, so `limit=100` from 1995 costs 100 bars.
    """
    per_day = 1440 if feed.hours == "24/7" or symbol.startswith("@") else 390
    bars_per_day = max(1.0, per_day * 60 / interval.seconds) if interval is not Interval.D1 else 1.0
    span_days = limit / bars_per_day * (1.0 if per_day == 1440 else 1.5) + 4
    floor_ns = _EARLIEST_NS
    cover = feed.coverage()
    if cover is not None:
        floor_ns = max(floor_ns, cover[0] - 2 * 86_400 * NS_PER_S)
    while True:
        window = int(span_days * 86_400) * NS_PER_S
        if start_ns is not None:
            hi = min(end_ns, start_ns + window)
            got = history(feed, symbol, interval, start_ns, hi, now_ns)
            if len(got) >= limit or hi >= end_ns:
                return got.take(slice(0, limit))
        else:
            lo = max(floor_ns, end_ns - window)
            got = history(feed, symbol, interval, lo, end_ns, now_ns)
            if len(got) >= limit or lo <= floor_ns:
                return got.take(slice(max(0, len(got) - limit), len(got)))
        span_days *= 2


_EARLIEST_NS = int(datetime(1980, 1, 1, tzinfo=UTC).timestamp()) * NS_PER_S
