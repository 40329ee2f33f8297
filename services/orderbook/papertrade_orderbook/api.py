"""REST of CONTRACT.md: book depth, the symbols with books, synthetic liquidity on/off (admin)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from papertrade.service import ApiError
from papertrade.service.app import AdminDep
from papertrade.symbols import normalize_symbol
from papertrade_orderbook.exchange import Exchange

router = APIRouter(tags=["orderbook"])


class LiquidityBody(BaseModel):
    """`enabled` switches the synthetic market maker of the symbol; the rest override its config."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool
    spread_bps: Decimal | None = Field(None, ge=0, le=10_000)
    levels: int | None = Field(None, ge=0, le=100)
    size: Decimal | None = Field(None, gt=0, le=Decimal("1e9"))
    step_bps: Decimal | None = Field(None, ge=0, le=10_000)
    size_step: Decimal | None = Field(None, ge=0, le=Decimal("1e9"))
    refresh_bars: int | None = Field(None, ge=1, le=10_000)


@router.get("/v1/books/{symbol}", summary="Depth of a symbol's book, best first")
async def get_book(request: Request, symbol: str, depth: int = Query(10, ge=1, le=1000)) -> dict[str, Any]:
    ex = _exchange(request)
    sym = normalize_symbol(symbol)
    book = ex.books.get(sym)
    if book is None:
        raise ApiError(404, f"no book for symbol {sym}")
    return book.depth(depth)


@router.get(
    "/v1/books/{symbol}/orders",
    summary="Every open order of a book, by side and priority, then dormant stops (admin)",
    dependencies=[AdminDep],
)
async def get_book_orders(request: Request, symbol: str) -> dict[str, Any]:
    ex = _exchange(request)
    sym = normalize_symbol(symbol)
    book = ex.books.get(sym)
    if book is None:
        raise ApiError(404, f"no book for symbol {sym}")
    return {"symbol": sym, "seq": book.seq, "orders": [_order_json(o) for o in book.snapshot()]}


@router.get("/v1/symbols", summary="The symbols with books")
async def get_symbols(request: Request) -> list[str]:
    return sorted(_exchange(request).books)


@router.get("/v1/books/{symbol}/liquidity", summary="The synthetic liquidity switch and config of a symbol")
async def get_liquidity(request: Request, symbol: str) -> dict[str, Any]:
    sym = normalize_symbol(symbol)
    return (await _exchange(request).liquidity(sym)).to_json(sym)


@router.put(
    "/v1/books/{symbol}/liquidity",
    summary="Switch synthetic liquidity on or off for a symbol (admin)",
    dependencies=[AdminDep],
)
async def put_liquidity(request: Request, symbol: str, body: LiquidityBody) -> dict[str, Any]:
    sym = normalize_symbol(symbol)
    state = await _exchange(request).set_liquidity(sym, body.model_dump(exclude_none=True))
    return state.to_json(sym)


def _order_json(o: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if v is not None and not isinstance(v, bool | int) else v) for k, v in o.items()}


def _exchange(request: Request) -> Exchange:
    ex: Exchange = request.app.state.ctx.state["exchange"]
    return ex
