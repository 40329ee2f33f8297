"""The broker service: the Alpaca-compatible trading API and the ledger of orders, fills, positions and cash.

Start-up: Alembic migrations (`alembic_version_broker`), the order desk, and the durable JetStream
consumer that books execution reports. Admin extension beside CONTRACT.md's: `GET /admin/accounts/{id}`
and `POST /admin/accounts/{id}/keys` (201 `{"account_id", "api_key_id", "api_secret_key"}`, 404 for an
unknown account) so that the strategy-runner can mint a key pair for an existing account.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import ORJSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.middleware import Middleware

from papertrade.db import migrate_async
from papertrade.service import ServiceContext, create_app
from papertrade.service.errors import error_response
from papertrade_broker import hotpath, recovery
from papertrade_broker.consumer import LedgerProcess
from papertrade_broker.desk import Desk
from papertrade_broker.market import Market
from papertrade_broker.routes import SubmitFastPath, admin, v2
from papertrade_broker.settings import BrokerSettings

NAME = "broker"
NEEDS = ("nats", "postgres", "redis")
MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_broker"


def build_app(settings: BrokerSettings | None = None) -> FastAPI:
    """The broker app; `settings` default to the environment."""
    settings = settings or BrokerSettings()
    ctx = ServiceContext(NAME, settings, needs=NEEDS)

    async def start(ctx: ServiceContext) -> None:
        if settings.migrate:
            await migrate_async(settings.database_url, MIGRATIONS, VERSION_TABLE)
        engine = create_async_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_pool_size,
            pool_pre_ping=False,
            pool_recycle=1800,
        )
        ctx.state["engine"] = engine
        pool = hotpath.new_pool(settings.database_url, settings.db_pool_size)
        await pool.open(wait=True, timeout=30)
        ctx.state["pool"] = pool
        desk = Desk(ctx, Market(ctx.links.redis), settings.risk_timeout, engine, pool, settings.risk_batch)
        desk.start()
        ctx.state["desk"] = desk
        ctx.spawn(
            recovery.recover_in_background(settings.recovery_grace, desk.recover_pending, ctx.stopping),
            "broker-recovery",
        )
        runner = LedgerProcess(settings, settings.ledger_durable)
        ctx.state["ledger"] = runner
        runner.start()

        async def readiness() -> dict[str, str]:
            if not runner.alive():
                return {"ledger": "consumer process is not running"}
            return {"ledger": "ok" if runner.ready else "consumer not subscribed yet"}

        ctx.state["readiness"] = readiness

    async def stop(ctx: ServiceContext) -> None:
        runner = ctx.state.get("ledger")
        if runner is not None:
            await asyncio.to_thread(runner.stop)
        desk = ctx.state.get("desk")
        if desk is not None:
            await desk.stop()
        engine = ctx.state.get("engine")
        if engine is not None:
            await engine.dispose()
        pool = ctx.state.get("pool")
        if pool is not None:
            await pool.close()

    app = create_app(
        ctx,
        routers=[v2, admin],
        on_startup=[start],
        on_shutdown=[stop],
        description=(
            "The Alpaca-compatible trading API (`/v2`, auth by APCA-API-KEY-ID / APCA-API-SECRET-KEY) and the "
            "ledger of orders, fills, positions and cash. Admin (`/admin`, Bearer token): POST/GET "
            "/admin/accounts, GET /admin/accounts/{id}, POST /admin/accounts/{id}/keys."
        ),
    )
    app.add_exception_handler(DBAPIError, _database_error)
    # Innermost of the app's middleware: inside the metrics middleware, outside the exception one.
    app.user_middleware.append(Middleware(SubmitFastPath))
    return app


async def _database_error(request: Request, exc: Exception) -> ORJSONResponse:
    """A value Postgres refuses (e.g. a NUL in a string) is bad input: 422; a lost database is a 503."""
    if isinstance(exc, DataError):
        return error_response(422, f"invalid value: {str(exc.orig).splitlines()[0] if exc.orig else exc}")
    return error_response(503, f"database unavailable: {type(exc).__name__}")
