"""The streamer service: a thin shell around the shared bars cores.

At startup it builds the feed (synthetic / replay / polygon), takes the watchlist (env, or the one kept
in Redis), makes sure the MD JetStream stream exists, and starts the run the settings describe
(`STREAMER_MODE`); `POST /admin/run` replaces it later. See `papertrade_streamer.engine` for how bars
are published and `papertrade_streamer.settings` for every env var.
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI

from papertrade import keys
from papertrade.bars.series import dt_to_ns
from papertrade.bus.streams import MD_STREAM, ensure_streams
from papertrade.enums import Interval
from papertrade.service import ServiceContext, create_app
from papertrade.timeutil import utcnow
from papertrade_streamer.api import default_run, router
from papertrade_streamer.engine import Engine, Watchlist
from papertrade_streamer.feeds import make_feed
from papertrade_streamer.settings import StreamerSettings

NAME = "streamer"
NEEDS = ("nats", "redis")


def build_app(settings: StreamerSettings | None = None) -> FastAPI:
    """The streamer app; `settings` default to the environment."""
    settings = settings or StreamerSettings()
    ctx = ServiceContext(NAME, settings, needs=NEEDS)
    feed = make_feed(settings)
    symbols = settings.symbol_list
    if settings.feed == "replay" and not settings.symbols_explicit:
        symbols = sorted(feed.series)  # type: ignore[attr-defined]
    engine = Engine(feed, Watchlist(symbols, settings.interval_list), settings.hours, settings.chunk_days)
    engine.nats = lambda: ctx.links.nats
    engine.redis = lambda: ctx.links.redis
    ctx.state["engine"] = engine
    if settings.start_time is not None:
        engine.clock.set(dt_to_ns(settings.start_time))

    async def start(ctx: ServiceContext) -> None:
        ctx.spawn(_boot(ctx, settings, engine), "streamer-boot")

    async def stop(ctx: ServiceContext) -> None:
        engine.stop_run()
        await engine.wait()

    return create_app(
        ctx,
        routers=[router],
        on_startup=[start],
        on_shutdown=[stop],
        description="Market data: synthetic, replayed and Polygon bars on NATS; history over REST.",
    )


async def _boot(ctx: ServiceContext, settings: StreamerSettings, engine: Engine) -> None:
    """Once NATS answers: the MD stream, the watchlist in Redis, then the configured run."""
    nc = await ctx.links.wait_nats()
    await ensure_streams(nc.jetstream(), (MD_STREAM,))
    redis = ctx.links.redis
    if not settings.symbols_explicit and settings.feed != "replay":
        kept = await redis.get(keys.WATCHLIST)
        if kept:
            try:
                data = orjson.loads(kept)
                engine.watch.symbols = [str(s) for s in data["symbols"]]
                engine.watch.intervals = [Interval.parse(str(i)) for i in data["intervals"]]
            except (ValueError, KeyError, TypeError):
                ctx.log.warning("ignoring a malformed watchlist in redis")
    await redis.set(keys.WATCHLIST, orjson.dumps(engine.watch.to_json()))
    if settings.autostart:
        start_ns = dt_to_ns(settings.start_time) if settings.start_time else None
        end_ns = dt_to_ns(settings.end_time) if settings.end_time else None
        if start_ns is None and engine.feed.coverage() is None and settings.mode != "replay":
            start_ns = dt_to_ns(utcnow())
        spec = default_run(engine, settings.mode, start_ns, end_ns, settings.speed)
        engine.start_run(spec)
        ctx.log.info("run started", **spec.to_json(), feed=engine.feed.name)
