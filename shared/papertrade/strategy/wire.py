"""Alpaca JSON shapes <-> the models a strategy sees (orders, positions, account, trade updates).

The live context reads the broker's REST answers with these; the backtester writes the `order` of
its trade updates with `order_to_alpaca`, so a strategy sees the same shape in both.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from uuid import UUID

from papertrade.enums import OrderStatus, OrderType, Side, TimeInForce
from papertrade.models import Order, Position
from papertrade.money import ZERO, fmt
from papertrade.strategy.context import AccountSnapshot
from papertrade.timeutil import iso, parse_time

_TIME_FIELDS = (
    "created_at",
    "updated_at",
    "submitted_at",
    "filled_at",
    "canceled_at",
    "expired_at",
    "failed_at",
    "replaced_at",
)


def order_to_alpaca(order: Order) -> dict[str, Any]:
    """The Alpaca Order JSON of an order (decimals as strings, times ISO 8601 UTC)."""
    out: dict[str, Any] = {
        "id": str(order.id),
        "client_order_id": order.client_order_id,
        "symbol": order.symbol,
        "asset_class": "crypto" if order.symbol.startswith("@") else "us_equity",
        "side": order.side.value,
        "type": order.type.value,
        "order_type": order.type.value,
        "time_in_force": order.time_in_force.value,
        "qty": fmt(order.qty),
        "notional": fmt(order.notional),
        "filled_qty": fmt(order.filled_qty),
        "filled_avg_price": fmt(order.filled_avg_price),
        "limit_price": fmt(order.limit_price),
        "stop_price": fmt(order.stop_price),
        "status": order.status.value,
        "extended_hours": order.extended_hours,
        "all_or_none": order.all_or_none,
        "replaced_by": str(order.replaced_by) if order.replaced_by else None,
        "replaces": str(order.replaces) if order.replaces else None,
    }
    for name in _TIME_FIELDS:
        value = getattr(order, name)
        out[name] = iso(value) if value is not None else None
    if order.reason:
        out["reason"] = order.reason
    return out


def order_from_alpaca(data: dict[str, Any], account_id: UUID) -> Order:
    """An Alpaca Order JSON (as the broker answers it) as an Order."""
    times = {name: parse_time(data[name], name) for name in _TIME_FIELDS if data.get(name)}
    return Order(
        id=UUID(str(data["id"])),
        client_order_id=str(data.get("client_order_id") or ""),
        account_id=account_id,
        symbol=str(data["symbol"]),
        side=Side(str(data["side"]).lower()),
        type=OrderType(str(data.get("type") or data.get("order_type") or "market").lower()),
        time_in_force=TimeInForce(str(data.get("time_in_force") or "day").lower()),
        qty=_dec(data.get("qty")),
        notional=_dec(data.get("notional")),
        limit_price=_dec(data.get("limit_price")),
        stop_price=_dec(data.get("stop_price")),
        all_or_none=bool(data.get("all_or_none") or False),
        extended_hours=bool(data.get("extended_hours") or False),
        status=OrderStatus(str(data.get("status") or "new").lower()),
        filled_qty=_dec(data.get("filled_qty")) or ZERO,
        filled_avg_price=_dec(data.get("filled_avg_price")),
        replaced_by=UUID(str(data["replaced_by"])) if data.get("replaced_by") else None,
        replaces=UUID(str(data["replaces"])) if data.get("replaces") else None,
        reason=data.get("reason"),
        **times,
    )


def position_from_alpaca(data: dict[str, Any], account_id: UUID) -> Position:
    """An Alpaca Position JSON as a signed Position (short positions have qty < 0)."""
    qty = _dec(data.get("qty")) or ZERO
    if str(data.get("side", "long")).lower() == "short" and qty > 0:
        qty = -qty
    return Position(
        account_id=account_id,
        symbol=str(data["symbol"]),
        qty=qty,
        avg_entry_price=_dec(data.get("avg_entry_price")) or ZERO,
        realized_pl=_dec(data.get("realized_pl")) or ZERO,
    )


def account_from_alpaca(data: dict[str, Any]) -> AccountSnapshot:
    return AccountSnapshot(
        cash=_dec(data.get("cash")) or ZERO,
        equity=_dec(data.get("equity")) or _dec(data.get("portfolio_value")) or ZERO,
        buying_power=_dec(data.get("buying_power")) or ZERO,
        long_market_value=_dec(data.get("long_market_value")) or ZERO,
        short_market_value=_dec(data.get("short_market_value")) or ZERO,
    )


def _dec(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    return Decimal(str(value))
