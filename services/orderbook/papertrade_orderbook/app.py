"""The orderbook service: a thin shell around the matching engine (papertrade.book).

`papertrade_orderbook.exchange.Exchange` consumes `ex.cmd.>` in stream order, publishes execution
reports, prints and quotes, expires DAY orders and runs the synthetic liquidity agent;
`papertrade_orderbook.api` serves the REST of CONTRACT.md.
"""

from __future__ import annotations

from fastapi import FastAPI

from papertrade.service import ServiceContext, create_app
from papertrade_orderbook.api import router
from papertrade_orderbook.exchange import Exchange
from papertrade_orderbook.settings import OrderbookSettings

NAME = "orderbook"
NEEDS = ("nats", "redis")


def build_app(settings: OrderbookSettings | None = None) -> FastAPI:
    """The orderbook app; `settings` default to the environment."""
    settings = settings or OrderbookSettings()
    ctx = ServiceContext(NAME, settings, needs=NEEDS)
    exchange = Exchange(ctx, settings)
    ctx.state["exchange"] = exchange
    ctx.state["readiness"] = exchange.readiness

    async def start(ctx: ServiceContext) -> None:
        ctx.spawn(exchange.run(), "orderbook-exchange")

    async def stop(ctx: ServiceContext) -> None:
        if exchange.ready.is_set():
            await exchange.save_snapshot()

    return create_app(
        ctx,
        routers=[router],
        on_startup=[start],
        on_shutdown=[stop],
        description="The simulated exchange: price-time-priority limit order books with synthetic liquidity.",
    )
