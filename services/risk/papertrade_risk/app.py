"""The risk service: pre-trade checks on `risk.check`, limits and kill switches over REST.

Start-up: Alembic migrations (`alembic_version_risk`), then in the background: the `risk.check`
responder (queue group `risk`) and this replica's own subject, `risk.ctl`, the lease loop, the Redis
watch, the durable consumer of `ex.exec.>` that keeps positions and open exposure current, the
decision audit writer and the kill-switch restorer. Limits and kill switches persist in Postgres
(durable, the REST source of truth); their live copy, positions, open exposure and rate buckets are
in Redis, written behind by the account's owner through one Lua script (`papertrade_risk.store`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from redis.asyncio import Redis

from papertrade.db import migrate_async
from papertrade.service import ServiceContext, create_app
from papertrade_risk.engine import RiskChecker
from papertrade_risk.routes import router
from papertrade_risk.service import WATCH_BLOCK, RiskService
from papertrade_risk.settings import RiskSettings
from papertrade_risk.store import LuaBatcher

NAME = "risk"
NEEDS = ("nats", "postgres", "redis")
MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_risk"


def build_app(settings: RiskSettings | None = None) -> FastAPI:
    """The risk app; `settings` default to the environment."""
    settings = settings or RiskSettings()
    ctx = ServiceContext(NAME, settings, needs=NEEDS)

    async def start(ctx: ServiceContext) -> None:
        if settings.migrate:
            await migrate_async(settings.database_url, MIGRATIONS, VERSION_TABLE)
        # Clients of its own: no retries, short timeouts, so a lost Redis fails the check closed at
        # once instead of after the shared link's retries. Checks use one connection of their own.
        redis = Redis.from_url(
            settings.redis_url,
            decode_responses=False,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            retry_on_timeout=False,
            max_connections=64,
        )
        ctx.state["risk_redis"] = redis
        # the Redis watch blocks on a connection of its own (a pool connection held for the watch)
        watch = Redis.from_url(
            settings.redis_url,
            decode_responses=False,
            socket_timeout=settings.redis_timeout + WATCH_BLOCK,  # a round answers after WATCH_BLOCK
            socket_connect_timeout=settings.redis_timeout,
            retry_on_timeout=False,
            max_connections=2,
        )
        ctx.state["risk_watch"] = watch
        batcher = LuaBatcher(settings.redis_url, settings.redis_timeout)
        ctx.state["risk_batcher"] = batcher
        checker = RiskChecker(batcher, ctx.links.engine, lease=settings.lease, flush=settings.flush)
        svc = RiskService(ctx, checker, redis, settings.durable, watch=watch)
        ctx.state["risk"] = svc
        ctx.spawn(checker.run_leases(ctx.stopping), "risk-leases")
        ctx.spawn(svc.watch_redis(), "risk-redis-watch")
        ctx.spawn(svc.serve(), "risk-check-responder")
        ctx.spawn(svc.consume(), "risk-exec-consumer")
        ctx.spawn(svc.restore_kill_switches(), "risk-kill-restore")

        async def readiness() -> dict[str, str]:
            return {
                "risk.check": "ok" if svc.subscribed else "not subscribed yet",
                "ex.exec consumer": "ok" if svc.consuming else "not consuming yet",
                "ownership": checker.health(),
            }

        ctx.state["readiness"] = readiness

    async def stop(ctx: ServiceContext) -> None:
        svc = ctx.state.get("risk")
        if svc is not None:
            await svc.close()
        for name in ("risk_redis", "risk_watch"):
            client = ctx.state.get(name)
            if client is not None:
                await client.aclose()
        batcher = ctx.state.get("risk_batcher")
        if batcher is not None:
            await batcher.close()

    return create_app(
        ctx,
        routers=[router],
        on_startup=[start],
        on_shutdown=[stop],
        description=(
            "Pre-trade risk checks on NATS `risk.check`: approve, clip or reject every order. REST: "
            "GET/PUT /v1/limits/{account_id} (PUT admin), POST (admin) / GET /v1/kill-switch, "
            "GET /v1/decisions?account_id=&limit=, GET /v1/exposure/{account_id}, GET /v1/replica (admin)."
        ),
    )
