"""REST routes: Alpaca Trading API v2 under `/v2`, the admin API under `/admin`."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import ORJSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from papertrade.enums import Side
from papertrade.errors import ValidationError
from papertrade.instruments import instrument
from papertrade.ledger import buying_power, market_values
from papertrade.money import ZERO, fmt, to_decimal
from papertrade.service import ApiError
from papertrade.service.app import AdminDep
from papertrade.symbols import normalize_symbol
from papertrade.timeutil import parse_time
from papertrade_broker.desk import AccountInfo, Desk
from papertrade_broker.requests import AccountRequest, OrderRequest, ReplaceRequest
from papertrade_broker.tables import executions, orders
from papertrade_broker.views import account_view, activity_view, asset_id, asset_view, position_view

v2 = APIRouter(prefix="/v2", tags=["trading (Alpaca v2)"])
admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


async def get_desk(request: Request) -> Desk:
    # async: FastAPI runs a plain `def` dependency on a worker thread (a thread hop per request).
    desk: Desk = request.app.state.ctx.state["desk"]
    return desk


DeskDep = Annotated[Desk, Depends(get_desk)]


async def current_account(
    request: Request,
    apca_api_key_id: Annotated[str | None, Header(alias="APCA-API-KEY-ID")] = None,
    apca_api_secret_key: Annotated[str | None, Header(alias="APCA-API-SECRET-KEY")] = None,
) -> AccountInfo:
    """Alpaca auth: one key pair is one account."""
    return await (await get_desk(request)).authenticate(apca_api_key_id, apca_api_secret_key)


AccountDep = Annotated[AccountInfo, Depends(current_account)]


# --- orders ----------------------------------------------------------------------------------------


@v2.post("/orders", summary="Submit an order", response_class=ORJSONResponse, response_model=None)
async def submit_order(body: OrderRequest, acct: AccountDep, desk: DeskDep) -> ORJSONResponse:
    # The hot path: the Order dict straight to orjson (no response-model validation pass).
    return ORJSONResponse(await desk.submit(acct, body))


@v2.get("/orders", summary="List orders")
async def list_orders(
    acct: AccountDep,
    desk: DeskDep,
    status: str = "open",
    limit: int = 50,
    after: str | None = None,
    until: str | None = None,
    direction: str = "desc",
    symbols: str | None = None,
    side: str | None = None,
    nested: bool = False,
) -> list[dict[str, Any]]:
    if status not in ("open", "closed", "all"):
        raise ValidationError("status", f"must be open, closed or all, got {status!r}")
    if not 1 <= limit <= 500:
        raise ValidationError("limit", f"must be between 1 and 500, got {limit}")
    if direction not in ("asc", "desc"):
        raise ValidationError("direction", f"must be asc or desc, got {direction!r}")
    syms = [normalize_symbol(s, "symbols") for s in symbols.split(",") if s.strip()] if symbols else []
    side_value = None
    if side:
        try:
            side_value = Side(side.lower())
        except ValueError:
            raise ValidationError("side", f"must be buy or sell, got {side!r}") from None
    return await desk.list_orders(
        acct,
        status=status,
        limit=limit,
        after=parse_time(after, "after") if after else None,
        until=parse_time(until, "until") if until else None,
        direction=direction,
        symbols=syms,
        side=side_value,
    )


@v2.get("/orders:by_client_order_id", summary="Get an order by its client_order_id")
async def order_by_client_id(
    acct: AccountDep, desk: DeskDep, client_order_id: Annotated[str, Query(min_length=1)]
) -> dict[str, Any]:
    return await desk.get_by_coid(acct, client_order_id)


@v2.get("/orders/{order_id}", summary="Get an order")
async def get_order(order_id: str, acct: AccountDep, desk: DeskDep) -> dict[str, Any]:
    return await desk.get_order(acct, _order_uuid(order_id))


@v2.patch("/orders/{order_id}", summary="Replace an order (a new order replaces it)")
async def replace_order(
    order_id: str, body: ReplaceRequest, acct: AccountDep, desk: DeskDep
) -> dict[str, Any]:
    return await desk.replace(acct, _order_uuid(order_id), body)


@v2.delete("/orders/{order_id}", status_code=204, response_class=Response, summary="Cancel an order")
async def cancel_order(order_id: str, acct: AccountDep, desk: DeskDep) -> Response:
    await desk.cancel(acct, _order_uuid(order_id))
    return Response(status_code=204)


@v2.delete("/orders", status_code=207, summary="Cancel all open orders")
async def cancel_all_orders(acct: AccountDep, desk: DeskDep) -> ORJSONResponse:
    return ORJSONResponse(await desk.cancel_all(acct), status_code=207)


# --- positions -------------------------------------------------------------------------------------


@v2.get("/positions", summary="Open positions")
async def list_positions(acct: AccountDep, desk: DeskDep) -> list[dict[str, Any]]:
    held = await desk.open_positions(acct.id)
    prices = await desk.market.prices(held)
    return [position_view(s, p, prices.get(s)) for s, p in held.items()]


@v2.get("/positions/{symbol_or_asset_id}", summary="One open position")
async def get_position(symbol_or_asset_id: str, acct: AccountDep, desk: DeskDep) -> dict[str, Any]:
    held = await desk.open_positions(acct.id)
    symbol = _position_symbol(symbol_or_asset_id, held)
    prices = await desk.market.prices([symbol])
    return position_view(symbol, held[symbol], prices.get(symbol))


@v2.delete("/positions/{symbol_or_asset_id}", summary="Close a position with a market order")
async def close_position(
    symbol_or_asset_id: str,
    acct: AccountDep,
    desk: DeskDep,
    qty: str | None = None,
    percentage: str | None = None,
) -> dict[str, Any]:
    held = await desk.open_positions(acct.id)
    symbol = _position_symbol(symbol_or_asset_id, held)
    return await _close(desk, acct, symbol, held[symbol].qty, qty, percentage)


@v2.delete("/positions", status_code=207, summary="Close every position (207 per position)")
async def close_all_positions(acct: AccountDep, desk: DeskDep, cancel_orders: bool = False) -> ORJSONResponse:
    if cancel_orders:
        await desk.cancel_all(acct)
    held = await desk.open_positions(acct.id)
    results: list[dict[str, Any]] = []
    for symbol, pos in held.items():
        try:
            order = await _close(desk, acct, symbol, pos.qty, None, None)
            results.append({"symbol": symbol, "order_id": order["id"], "status": 200, "body": order})
        except ApiError as err:
            results.append(
                {"symbol": symbol, "status": err.status, "body": {"code": err.code, "message": err.message}}
            )
        except ValidationError as err:
            results.append({"symbol": symbol, "status": 422, "body": {"code": 42210000, "message": str(err)}})
    return ORJSONResponse(results, status_code=207)


# --- account, activities, clock, assets -------------------------------------------------------------


@v2.get("/account", summary="The account")
async def get_account(acct: AccountDep, desk: DeskDep) -> dict[str, Any]:
    row, held, reserved = await desk.account_state(acct.id)
    prices = await desk.market.prices(held)
    long_mv, short_mv = market_values((p.qty, prices.get(s, abs(p.avg_entry_price))) for s, p in held.items())
    bp = buying_power(row["cash"], short_mv, reserved)
    return account_view(row, long_mv=long_mv, short_mv=short_mv, buying_power=bp, reserved=reserved)


@v2.get("/account/activities/{activity_type}", summary="Account activities (FILL)")
async def get_activities(
    activity_type: str,
    acct: AccountDep,
    desk: DeskDep,
    date: str | None = None,
    after: str | None = None,
    until: str | None = None,
    direction: str = "desc",
    page_size: int = 100,
    page_token: str | None = None,
) -> list[dict[str, Any]]:
    if direction not in ("asc", "desc"):
        raise ValidationError("direction", f"must be asc or desc, got {direction!r}")
    if not 1 <= page_size <= 100:
        raise ValidationError("page_size", f"must be between 1 and 100, got {page_size}")
    if activity_type.upper() != "FILL":
        return []
    q = (
        select(executions, orders.c.status)
        .join(orders, orders.c.id == executions.c.order_id)
        .where(executions.c.account_id == acct.id)
    )
    if date:
        day = parse_time(date, "date")
        q = q.where(executions.c.t >= day, executions.c.t < day + _ONE_DAY)
    if after:
        q = q.where(executions.c.t > parse_time(after, "after"))
    if until:
        q = q.where(executions.c.t < parse_time(until, "until"))
    if page_token:
        exec_id = page_token.split("::", 1)[-1].replace("\x00", "")
        async with desk.engine.connect() as conn:
            seq = (
                await conn.execute(
                    select(executions.c.seq).where(
                        executions.c.account_id == acct.id, executions.c.exec_id == exec_id
                    )
                )
            ).scalar()
        if seq is None:
            raise ValidationError("page_token", f"unknown page token {page_token!r}")
        q = q.where(executions.c.seq < seq if direction == "desc" else executions.c.seq > seq)
    q = q.order_by(executions.c.seq.desc() if direction == "desc" else executions.c.seq.asc()).limit(
        page_size
    )
    async with desk.engine.connect() as conn:
        rows = (await conn.execute(q)).mappings().all()
    return [activity_view(r, r["status"]) for r in rows]


@v2.get("/clock", summary="The market clock (the streamer's time)")
async def get_clock(acct: AccountDep, desk: DeskDep) -> dict[str, Any]:
    return await desk.market.clock()


@v2.get("/assets", summary="The tradable assets (the streamer's watchlist)")
async def list_assets(
    acct: AccountDep,
    desk: DeskDep,
    status: str | None = None,
    asset_class: str | None = None,
    exchange: str | None = None,
) -> list[dict[str, Any]]:
    views = [asset_view(s) for s in sorted(await desk.market.symbols())]
    if status and status != "active":
        return []
    if asset_class:
        views = [v for v in views if v["class"] == asset_class]
    if exchange:
        views = [v for v in views if v["exchange"] == exchange]
    return views


@v2.get("/assets/{symbol_or_asset_id}", summary="One asset")
async def get_asset(symbol_or_asset_id: str, acct: AccountDep, desk: DeskDep) -> dict[str, Any]:
    symbols = await desk.market.symbols()
    for s in symbols:
        if s == symbol_or_asset_id.upper() or str(asset_id(s)) == symbol_or_asset_id.lower():
            return asset_view(s)
    raise ApiError.not_found(f"asset {symbol_or_asset_id} not found")


# --- admin -----------------------------------------------------------------------------------------


@admin.post("/accounts", status_code=201, summary="Create an account with a key pair (secret shown once)")
async def create_account(body: AccountRequest, desk: DeskDep) -> dict[str, Any]:
    return await desk.create_account(body)


@admin.get("/accounts", summary="The accounts (no secrets)")
async def list_accounts(desk: DeskDep) -> list[dict[str, Any]]:
    return await desk.list_accounts()


@admin.get("/accounts/{account_id}", summary="One account (no secrets)")
async def get_account_admin(account_id: str, desk: DeskDep) -> dict[str, Any]:
    return await desk.get_account_admin(_account_uuid(account_id))


@admin.post("/accounts/{account_id}/keys", status_code=201, summary="A new key pair for an existing account")
async def new_account_key(account_id: str, desk: DeskDep) -> dict[str, Any]:
    return await desk.new_key(_account_uuid(account_id))


# --- helpers ---------------------------------------------------------------------------------------

_ONE_DAY = timedelta(days=1)


def _order_uuid(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise ApiError.not_found(f"order {value} not found") from None


def _account_uuid(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise ApiError.not_found(f"account {value} not found") from None


def _position_symbol(value: str, held: dict[str, Any]) -> str:
    for s in held:
        if s == value.upper() or str(asset_id(s)) == value.lower():
            return s
    raise ApiError.not_found(f"position does not exist: {value}")


async def _close(
    desk: Desk, acct: AccountInfo, symbol: str, held: Decimal, qty: str | None, percentage: str | None
) -> dict[str, Any]:
    if qty is not None and percentage is not None:
        raise ValidationError("qty", "give qty or percentage, not both")
    amount = abs(held)
    if qty is not None:
        amount = to_decimal(qty, "qty", positive=True)
        if amount > abs(held):
            raise ApiError.forbidden(
                f"insufficient qty available for order (requested: {fmt(amount)}, available: {fmt(abs(held))})"
            )
    elif percentage is not None:
        pct = to_decimal(percentage, "percentage", positive=True)
        if pct > 100:
            raise ValidationError("percentage", "must be at most 100")
        lot = instrument(symbol).lot
        amount = (abs(held) * pct / 100 // lot) * lot
        if amount <= ZERO:
            raise ValidationError("percentage", "closes less than one lot")
    side = "sell" if held > 0 else "buy"
    body = OrderRequest(symbol=symbol, side=side, type="market", time_in_force="day", qty=fmt(amount))
    return await desk.submit(acct, body)


class SubmitFastPath:
    """`POST /v2/orders` without FastAPI's per-request dependency solving (the broker's hottest route).

    Pure ASGI, inside the metrics middleware (the request is counted under the route's template) and
    outside the exception middleware (so errors go through the app's own handlers here). Only a
    well-formed request takes it: a JSON body that `OrderRequest` accepts; anything else (no body,
    another content type, invalid JSON or fields) is replayed to the FastAPI route, which answers
    exactly as before. The route stays declared above for the OpenAPI schema."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._route: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v2/orders":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        request = Request(scope, receive)
        order = _parse_order(request, body)
        if order is None:
            await self.app(scope, _replay(body, receive), send)
            return
        scope["route"] = self._route or self._find_route()
        desk: Desk = scope["app"].state.ctx.state["desk"]
        try:
            acct = await desk.authenticate(
                request.headers.get("apca-api-key-id"), request.headers.get("apca-api-secret-key")
            )
            body = orjson.dumps(await desk.submit(acct, order))
        except Exception as exc:
            handler = _exception_handler(scope["app"], exc)
            if handler is None:
                raise
            response: Response = await handler(request, exc)
            await response(scope, receive, send)
            return
        # what ORJSONResponse sends, without building a Response per order
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), _JSON_CONTENT_TYPE],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _find_route(self) -> Any:
        """The declared route (what the router would put in the scope, for the metrics' route label)."""
        for route in v2.routes:
            if isinstance(route, APIRoute) and route.path == "/v2/orders" and "POST" in (route.methods or ()):
                self._route = route
        return self._route


_JSON_CONTENT_TYPE = (b"content-type", b"application/json")


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: nothing to submit
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _parse_order(request: Request, body: bytes) -> OrderRequest | None:
    """The order of a well-formed JSON body, else None (the FastAPI route will say what is wrong)."""
    content_type = request.headers.get("content-type", "")
    if not body or content_type.split(";", 1)[0].strip().lower() != "application/json":
        return None
    try:
        return OrderRequest.model_validate_json(body)
    except PydanticValidationError:
        return None


def _exception_handler(app: Any, exc: Exception) -> Any:
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
