"""The publishing engine: simulation clock, runs (realtime / accelerated / replay), NATS and Redis output.

One code path for every mode. Time is cut into chunks of whole New York days; for each chunk the
engine prepares every bar of the watchlist (1-minute base bars and their aggregates, each with the
instant it closes: t + interval, a daily bar at its session's last minute) sorted by (close time,
interval, symbol), then emits them: at once in `replay` (as fast as possible), or each when the
simulation clock reaches its close in `realtime` / `accelerated` (the clock runs at `speed` x the wall
clock from `start`, any instant).

Publishing is NATS *core* publish on `md.bar.<interval>.<symbol>`, which the MD JetStream stream
captures (bounded history for late subscribers). Deliberately not the acked JetStream publish: an ack
per bar costs a round trip (5,000 msg/s sequential, ~39,000/s batched on this machine) against
~300,000/s for core publish, and DESIGN.md accepts at-most-once for market data. After each chunk the
engine flushes (a PING/PONG round trip) so it never runs ahead of the server by more than a chunk.

Redis gets the latest bar per (interval, symbol) and the clock after each emitted batch (and every
second of wall time while a clocked run waits).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from papertrade import calendar, keys
from papertrade.bars.aggregate import aggregate, in_session, new_york_midnight
from papertrade.bars.encode import payload_array
from papertrade.bars.series import NS_PER_S, BarSeries, dt_to_ns, ns_to_dt
from papertrade.bus.subjects import md_bar
from papertrade.enums import Interval
from papertrade.timeutil import iso, utcnow
from papertrade_streamer.feeds import Feed

_log = structlog.get_logger("streamer.engine")

DAY_NS = 86_400 * NS_PER_S


@dataclass
class Watchlist:
    symbols: list[str]
    intervals: list[Interval]

    def to_json(self) -> dict[str, Any]:
        return {"symbols": list(self.symbols), "intervals": [i.value for i in self.intervals]}


@dataclass
class RunSpec:
    mode: str  # realtime | accelerated | replay
    start_ns: int
    end_ns: int | None
    speed: float = 1.0

    def chunk_end(self, t_ns: int, days: int) -> int:
        return next_day_boundary(t_ns, days)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "start": iso(ns_to_dt(self.start_ns)),
            "end": iso(ns_to_dt(self.end_ns)) if self.end_ns is not None else None,
            "speed": self.speed,
        }


class SimClock:
    """Simulation time: fixed by the engine in replay mode, else `anchor + (wall - wall0) * speed`."""

    def __init__(self, start_ns: int, speed: float = 1.0, running: bool = False) -> None:
        self.anchor_ns = start_ns
        self.speed = speed
        self.running = running
        self._wall0 = time.monotonic()

    def now_ns(self) -> int:
        if not self.running:
            return self.anchor_ns
        return self.anchor_ns + int((time.monotonic() - self._wall0) * self.speed * NS_PER_S)

    def set(self, t_ns: int) -> None:
        self.anchor_ns = t_ns
        self._wall0 = time.monotonic()

    def start(self, t_ns: int, speed: float) -> None:
        self.anchor_ns, self.speed, self.running = t_ns, speed, True
        self._wall0 = time.monotonic()

    def freeze(self) -> None:
        self.anchor_ns = self.now_ns()
        self.running = False

    def wall_seconds_until(self, t_ns: int) -> float:
        return max(0.0, (t_ns - self.now_ns()) / NS_PER_S / self.speed)


@dataclass
class Chunk:
    """Prepared bars of some days in emission order (close time, interval, symbol).

    `data[offsets[i]:offsets[i + 1]]` is bar i's complete NATS `PUB` frame
    (`PUB <subject> <size>\r\n<json>\r\n`); its JSON body starts at `body_start[i]`. `key_id[i]` indexes
    `key_names` (its Redis latest-bar key) and `subjects`.
    """

    close: np.ndarray
    data: bytes
    offsets: np.ndarray
    body_start: np.ndarray
    key_id: np.ndarray
    key_names: list[str]
    subjects: list[str]

    def __len__(self) -> int:
        return int(self.close.shape[0])

    def body(self, i: int) -> bytes:
        return self.data[int(self.body_start[i]) : int(self.offsets[i + 1]) - 2]

    @classmethod
    def empty(cls) -> Chunk:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, b"", np.zeros(1, dtype=np.int64), z, z, [], [])


def prepare_chunk(feed: Feed, watch: Watchlist, day0_ns: int, day1_ns: int) -> Chunk:
    """Every bar closing in [day0, day1) (whole New York days) of the watchlist, framed and sorted."""
    closes: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    frames: list[pa.Array] = []
    headers: list[pa.Array] = []
    key_names: list[str] = []
    subjects: list[str] = []
    n_sym = max(1, len(watch.symbols))
    for si, symbol in enumerate(watch.symbols):
        if not feed.has(symbol):
            continue
        base_iv = feed.base_interval(symbol)
        base = feed.base_bars(symbol, day0_ns, day1_ns - 1)
        if len(base) == 0:
            continue
        for interval in watch.intervals:
            if interval.seconds < base_iv.seconds:
                continue
            bars, close = _with_close(base, interval, feed.hours)
            if len(bars) == 0:
                continue
            subj = md_bar(interval, symbol)
            body = payload_array(bars)
            header = pc.binary_join_element_wise(
                f"PUB {subj} ", pc.cast(pc.binary_length(body), pa.string()), "\r\n", ""
            )
            frames.append(pc.binary_join_element_wise(header, body, "\r\n", ""))
            headers.append(header)
            closes.append(close)
            ranks.append(np.full(len(bars), _INTERVAL_RANK[interval] * n_sym + si, dtype=np.int64))
            ids.append(np.full(len(bars), len(key_names), dtype=np.int64))
            key_names.append(keys.latest_bar(interval, symbol))
            subjects.append(subj)
    if not frames:
        return Chunk.empty()
    close_all = np.concatenate(closes)
    order = np.lexsort((np.concatenate(ranks), close_all))
    take = pa.array(order)
    framed = pc.take(pa.concat_arrays(frames).cast(pa.large_binary()), take)
    head_len = np.asarray(pc.binary_length(pc.take(pa.concat_arrays(headers), take)), dtype=np.int64)
    framed = pa.concat_arrays([framed])  # contiguous buffers
    buffers = framed.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[
        framed.offset : framed.offset + len(framed) + 1
    ].copy()
    data = buffers[2].to_pybytes() if buffers[2] is not None else b""
    if offsets[0]:
        data = data[int(offsets[0]) : int(offsets[-1])]
        offsets -= offsets[0]
    return Chunk(
        close_all[order],
        data,
        offsets,
        offsets[:-1] + head_len,
        np.concatenate(ids)[order],
        key_names,
        subjects,
    )


def next_day_boundary(t_ns: int, days: int = 1) -> int:
    """The New York midnight `days` days after the New York day holding `t_ns` begins."""
    day0 = int(new_york_midnight(np.array([t_ns], dtype=np.int64))[0])
    # step by 26h then re-normalise, so DST days (23h / 25h) land on midnight
    target = day0 + days * DAY_NS + 2 * 3600 * NS_PER_S
    return int(new_york_midnight(np.array([target], dtype=np.int64))[0])


def clock_json(t_ns: int, hours: str, speed: float = 0.0) -> dict[str, Any]:
    """The clock as published in Redis (`papertrade.keys.CLOCK`) and served at `GET /v1/clock`.

    `speed` (simulation seconds per wall second; 0 while the clock stands still) and `wall` (when this
    was true) let a reader compute the simulation time between two writes.
    """
    t = ns_to_dt(t_ns)
    always = hours == "24/7"
    return {
        "timestamp": iso(t),
        "is_open": calendar.is_open(t, None, hours),
        "next_open": iso(calendar.next_open(t, None, hours) if not always else t),
        "next_close": iso(calendar.next_close(t, None, hours)),
        "speed": speed,
        "wall": iso(utcnow()),
    }


class Engine:
    """Owns the clock and the current run; the REST layer reads its state."""

    def __init__(self, feed: Feed, watch: Watchlist, hours: str, chunk_days: int = 20) -> None:
        self.feed = feed
        self.watch = watch
        self.hours = hours
        self.chunk_days = chunk_days
        #: how often (wall seconds) a live feed's current day is fetched again once its bars ran out
        self.live_refresh_s = 30.0
        self.clock = SimClock(dt_to_ns(utcnow()))
        self.run_spec: RunSpec | None = None
        self.status = "idle"  # idle | running | finished | error
        self.error: str | None = None
        self.published = 0
        self.latest: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self.nats: Callable[[], NATS] | None = None
        self.redis: Callable[[], Redis] | None = None

    # --- control -----------------------------------------------------------------------------------

    def start_run(self, spec: RunSpec) -> None:
        """Replace any current run with `spec` (the clock jumps to its start)."""
        self.stop_run()
        self.run_spec = spec
        self.status = "running"
        self.error = None
        self.published = 0
        self.clock.set(spec.start_ns)
        self.clock.running = False
        self._task = asyncio.create_task(self._run(spec), name="streamer-run")

    def stop_run(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None
        self.clock.freeze()
        if self.status == "running":
            self.status = "stopped"

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def watchlist_changed(self) -> None:
        self._dirty.set()

    def now_ns(self) -> int:
        return self.clock.now_ns()

    def clock_state(self) -> dict[str, Any]:
        """`clock_json` of the simulation clock now, with its speed (0 when it stands still)."""
        clock = self.clock
        return clock_json(clock.now_ns(), self.hours, clock.speed if clock.running else 0.0)

    def status_json(self) -> dict[str, Any]:
        return {
            "feed": self.feed.name,
            "status": self.status,
            "error": self.error,
            "run": self.run_spec.to_json() if self.run_spec else None,
            "clock": iso(ns_to_dt(self.now_ns())),
            "published": self.published,
            "watchlist": self.watch.to_json(),
        }

    # --- the run -----------------------------------------------------------------------------------

    async def _run(self, spec: RunSpec) -> None:
        try:
            if spec.mode == "replay":
                await self._run_fast(spec)
            else:
                await self._run_clocked(spec)
            self.status = "finished"
            _log.info("run finished", published=self.published, **spec.to_json())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.status = "error"
            self.error = f"{type(exc).__name__}: {exc}"
            _log.exception("run failed")

    async def _run_fast(self, spec: RunSpec) -> None:
        assert spec.end_ns is not None
        t = spec.start_ns
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, self._prepare, t, spec.chunk_end(t, self.chunk_days))
        while t < spec.end_ns:
            chunk_end = spec.chunk_end(t, self.chunk_days)
            chunk = await pending
            nxt = min(chunk_end, spec.end_ns)
            if nxt < spec.end_ns:  # prepare the next chunk while this one is published
                pending = loop.run_in_executor(
                    None, self._prepare, chunk_end, spec.chunk_end(chunk_end, self.chunk_days)
                )
            lo = int(np.searchsorted(chunk.close, t, side="right"))
            hi = int(np.searchsorted(chunk.close, spec.end_ns, side="right"))
            await self._emit(chunk, lo, hi)
            t = nxt
            self.clock.set(t)
            await self._write_state()
            if self.nats is not None:
                await self.nats().flush(timeout=30)

    async def _run_clocked(self, spec: RunSpec) -> None:
        self.clock.start(spec.start_ns, spec.speed)
        t = spec.start_ns  # everything closing at or before t has been emitted
        last_state = 0.0
        primed = False
        while spec.end_ns is None or t < spec.end_ns:
            chunk_end = next_day_boundary(t, 1)
            self._dirty.clear()
            chunk = await asyncio.to_thread(self._prepare, t, chunk_end)
            prepared_at = time.monotonic()
            stop_at = chunk_end if spec.end_ns is None else min(chunk_end, spec.end_ns)
            i = int(np.searchsorted(chunk.close, t, side="right"))
            if not primed:
                # Bars that closed before the run's start are not published, but they are the latest
                # the other services find in Redis at once (the orderbook quotes new books by them).
                primed = True
                self._remember(chunk, 0, i)
                await self._write_state()
            while True:
                now = self.clock.now_ns()
                if self._dirty.is_set():
                    break  # watchlist changed: prepare this chunk again from t
                if (
                    self.feed.live
                    and i >= len(chunk)
                    and now < stop_at
                    and time.monotonic() - prepared_at >= self.live_refresh_s
                ):
                    break  # a live feed's day is still growing: fetch it again from t
                hi = int(np.searchsorted(chunk.close, min(now, stop_at), side="right"))
                if hi > i:
                    await self._emit(chunk, i, hi)
                    i = hi
                    await self._write_state()
                    last_state = time.monotonic()
                t = max(t, min(now, stop_at))
                if t >= stop_at:
                    break
                if time.monotonic() - last_state >= 1.0:
                    await self._write_state()
                    last_state = time.monotonic()
                target = int(chunk.close[i]) if i < len(chunk) else stop_at
                delay = min(1.0, self.clock.wall_seconds_until(min(target, stop_at)))
                try:
                    await asyncio.wait_for(self._dirty.wait(), timeout=max(delay, 0.001))
                except TimeoutError:
                    pass
        self.clock.freeze()
        if spec.end_ns is not None:
            self.clock.set(spec.end_ns)
        await self._write_state()

    def _prepare(self, t_ns: int, end_ns: int) -> Chunk:
        day0 = int(new_york_midnight(np.array([t_ns], dtype=np.int64))[0])
        return prepare_chunk(
            self.feed, Watchlist(list(self.watch.symbols), list(self.watch.intervals)), day0, end_ns
        )

    async def _emit(self, chunk: Chunk, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        if self.nats is not None:
            await publish_frames(self.nats(), chunk, lo, hi)
        self._remember(chunk, lo, hi)
        self.published += hi - lo

    def _remember(self, chunk: Chunk, lo: int, hi: int) -> None:
        """Each key's last bar among `chunk[lo:hi]` becomes its latest (Redis, `GET /v1/latest`)."""
        if hi <= lo:
            return
        ids = chunk.key_id[lo:hi][::-1]
        _, last = np.unique(ids, return_index=True)
        for i in (hi - 1 - last).tolist():
            self.latest[chunk.key_names[int(chunk.key_id[i])]] = chunk.body(i)

    async def _write_state(self) -> None:
        if self.redis is None:
            return
        r = self.redis()
        pipe = r.pipeline(transaction=False)
        pipe.set(keys.CLOCK, orjson.dumps(self.clock_state()))
        if self.latest:
            pipe.mset(self.latest)
        try:
            await pipe.execute()
        except Exception as exc:  # Redis down: keep publishing, say so
            _log.warning("redis write failed", error=str(exc))


async def publish_frames(nc: NATS, chunk: Chunk, lo: int, hi: int, slice_bytes: int = 256 * 1024) -> None:
    """Publish bars lo..hi-1 of a chunk, one NATS message each.

    The PUB frames are already built (in bulk, by pyarrow), so they are handed to the client's outgoing
    buffer a slice (~256 KB) at a time, then its flusher writes them; waiting for that write is the back
    pressure. This is what `nc.publish` does per message, minus ~2 us of Python per message; if the
    client's internals ever change, the plain `nc.publish` loop is used instead.
    """
    send = getattr(nc, "_send_command", None)
    flush = getattr(nc, "_flush_pending", None)
    if send is None or flush is None or not nc.is_connected:
        for i in range(lo, hi):
            await nc.publish(chunk.subjects[int(chunk.key_id[i])], chunk.body(i))
        return
    offsets = chunk.offsets
    a = lo
    while a < hi:
        b = int(np.searchsorted(offsets, offsets[a] + slice_bytes, side="right")) - 1
        b = min(max(b, a + 1), hi)
        await send(chunk.data[int(offsets[a]) : int(offsets[b])])
        nc.stats["out_msgs"] += b - a
        nc.stats["out_bytes"] += int(offsets[b] - offsets[a])
        await flush(force_flush=True)
        a = b


def _with_close(base: BarSeries, interval: Interval, hours: str) -> tuple[BarSeries, np.ndarray]:
    """`base` aggregated into `interval`, and each bar's close instant (ns)."""
    bars = aggregate(base, interval, hours=hours)
    if interval is not Interval.D1:
        return bars, bars.t + interval.seconds * NS_PER_S
    if base.interval is Interval.D1:
        return bars, bars.t + DAY_NS
    # a daily bar closes with the last base bar of its (session) day
    b = base if calendar.always_open(base.symbol, hours) else base.take(in_session(base.t))
    day = new_york_midnight(b.t)
    idx = np.searchsorted(day, bars.t, side="right") - 1
    return bars, b.t[idx] + b.interval.seconds * NS_PER_S


_INTERVAL_RANK = {iv: i for i, iv in enumerate(Interval)}
