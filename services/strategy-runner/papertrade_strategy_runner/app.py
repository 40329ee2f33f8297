"""The strategy-runner service: deployments of strategies over REST, one process per strategy.

Start-up: Alembic migrations (`alembic_version_strategy_runner`), then every deployment that should
run is started again (deployments persist in Postgres). Each strategy process is
`python -m papertrade_strategy_runner.container` (the strategy container's command): it subscribes to
its `md.bar.<interval>.<symbol>` and `broker.event.<account_id>` and trades through the broker's REST
API with a key pair the runner mints for it (`POST /admin/accounts/{id}/keys` on the broker).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from papertrade.db import migrate_async
from papertrade.service import ServiceContext, create_app
from papertrade_strategy_runner.routes import router
from papertrade_strategy_runner.settings import StrategyRunnerSettings
from papertrade_strategy_runner.supervisor import Supervisor

NAME = "strategy-runner"
NEEDS = ("nats", "postgres", "redis")
MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_strategy_runner"


def build_app(settings: StrategyRunnerSettings | None = None) -> FastAPI:
    """The strategy-runner app; `settings` default to the environment."""
    settings = settings or StrategyRunnerSettings()
    ctx = ServiceContext(NAME, settings, needs=NEEDS)
    return create_app(
        ctx,
        routers=[router],
        on_startup=[_start],
        on_shutdown=[_stop],
        description="Runs user strategies against the stack; deploy, stop, start and inspect them over REST.",
    )


async def _start(ctx: ServiceContext) -> None:
    await migrate_async(ctx.settings.database_url, MIGRATIONS, VERSION_TABLE)
    sup = Supervisor(ctx.settings, ctx.links.engine)
    ctx.state["supervisor"] = sup
    ctx.spawn(sup.load(), "resume-deployments")


async def _stop(ctx: ServiceContext) -> None:
    sup = ctx.state.get("supervisor")
    if sup is not None:
        await sup.close()
