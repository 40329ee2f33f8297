"""What the broker reads from Redis: the tradable symbols, latest prices and the streamer's clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from redis.asyncio import Redis

from papertrade import keys
from papertrade.enums import Interval
from papertrade.money import to_decimal
from papertrade.timeutil import iso, parse_time, utcnow

#: How long the watchlist is cached in-process (it changes rarely; a new symbol is visible after this).
WATCHLIST_TTL = 1.0
#: How long the streamer's clock is cached for the `t` of risk checks (a Redis read per order otherwise).
CLOCK_TTL = 0.1
#: How far past its last write a running streamer clock is moved on at its speed. The streamer writes
#: it at least every second while it runs; an older one belongs to a streamer that stopped or died.
CLOCK_EXTRAPOLATE_MAX = timedelta(seconds=2)


class Market:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._watchlist: frozenset[str] = frozenset()
        self._watchlist_at = -1e9
        #: the streamer's last published clock: (simulation time, wall time it held at, speed)
        self._clock: tuple[datetime, datetime, float] | None = None
        self._sim_time_at = -1e9
        self._watchlist_read: asyncio.Future[None] | None = None
        self._sim_time_read: asyncio.Future[None] | None = None

    async def symbols(self) -> frozenset[str]:
        """The tradable symbols: the streamer's watchlist (`papertrade.keys.WATCHLIST`)."""
        if time.monotonic() - self._watchlist_at > WATCHLIST_TTL:
            # One read for every request that finds the cache stale at once (not one each).
            if self._watchlist_read is None or self._watchlist_read.done():
                self._watchlist_read = asyncio.ensure_future(self._read_watchlist())
            await asyncio.shield(self._watchlist_read)
        return self._watchlist

    async def _read_watchlist(self) -> None:
        now = time.monotonic()
        raw = await self.redis.get(keys.WATCHLIST)
        symbols: frozenset[str] = frozenset()
        if raw:
            try:
                data = orjson.loads(raw)
                symbols = frozenset(str(s).upper() for s in data.get("symbols", []))
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                symbols = frozenset()
        self._watchlist = symbols
        self._watchlist_at = now

    def forget_symbols(self) -> None:
        self._watchlist_at = -1e9

    async def prices(self, symbols: Iterable[str]) -> dict[str, Decimal]:
        """The latest price per symbol: the book's last trade when fresher than the latest 1m bar."""
        syms = list(dict.fromkeys(symbols))
        if not syms:
            return {}
        names: list[str] = []
        for s in syms:
            names.append(keys.last_trade(s))
            names.append(keys.latest_bar(Interval.M1, s))
        values = await self.redis.mget(names)
        out: dict[str, Decimal] = {}
        for i, s in enumerate(syms):
            price = _pick(values[2 * i], values[2 * i + 1])
            if price is not None:
                out[s] = price
        return out

    async def price(self, symbol: str) -> Decimal | None:
        return (await self.prices([symbol])).get(symbol)

    async def sim_time(self) -> datetime | None:
        """The streamer's simulation time now (`papertrade.keys.CLOCK`); None without a streamer clock.

        Its last published time moved on at its speed since then (at most `CLOCK_EXTRAPOLATE_MAX`), so a
        clock running in real time reads as the wall clock, not as up to a second behind it.
        """
        if time.monotonic() - self._sim_time_at > CLOCK_TTL:
            if self._sim_time_read is None or self._sim_time_read.done():
                self._sim_time_read = asyncio.ensure_future(self._read_sim_time())
            await asyncio.shield(self._sim_time_read)
        clock = self._clock
        if clock is None:
            return None
        t, wall, speed = clock
        if speed <= 0:
            return t
        return t + min(max(utcnow() - wall, timedelta(0)), CLOCK_EXTRAPOLATE_MAX) * speed

    async def exchange_time(self) -> datetime:
        """The exchange's time: the streamer's simulation time (`sim_time`), else the wall clock."""
        return await self.sim_time() or utcnow()

    async def _read_sim_time(self) -> None:
        now = time.monotonic()
        clock: tuple[datetime, datetime, float] | None = None
        try:
            raw = await self.redis.get(keys.CLOCK)
            if raw:
                data = orjson.loads(raw)
                t = parse_time(data["timestamp"])
                wall = data.get("wall")
                clock = (t, parse_time(wall) if wall else t, float(data.get("speed") or 0.0))
        except Exception:  # unreadable or Redis down: the caller falls back to the wall clock
            clock = None
        self._clock = clock
        self._sim_time_at = now

    async def clock(self) -> dict[str, Any]:
        """Alpaca's clock: the streamer's (`papertrade.keys.CLOCK`), else the wall clock and NYSE calendar."""
        raw = await self.redis.get(keys.CLOCK)
        if raw:
            try:
                data = orjson.loads(raw)
                return {
                    "timestamp": iso(parse_time(data["timestamp"])),
                    "is_open": bool(data["is_open"]),
                    "next_open": iso(parse_time(data["next_open"])),
                    "next_close": iso(parse_time(data["next_close"])),
                }
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                pass
        from papertrade import calendar  # pandas + exchange_calendars: only when the streamer is not running

        now = utcnow()
        return {
            "timestamp": iso(now),
            "is_open": calendar.is_open(now),
            "next_open": iso(calendar.next_open(now)),
            "next_close": iso(calendar.next_close(now)),
        }


def _pick(last_raw: bytes | str | None, bar_raw: bytes | str | None) -> Decimal | None:
    last = _parse(last_raw, "price", "t")
    bar = _parse(bar_raw, "c", "t")
    if last is None:
        return bar[0] if bar is not None else None
    if bar is None:
        return last[0]
    return last[0] if last[1] >= bar[1] else bar[0]


def _parse(raw: bytes | str | None, price_key: str, time_key: str) -> tuple[Decimal, datetime] | None:
    if not raw:
        return None
    try:
        data = orjson.loads(raw)
        price = to_decimal(data[price_key], price_key, positive=True)
        t = parse_time(data.get(time_key) or "1970-01-01T00:00:00Z")
        return price, t
    except Exception:
        return None
