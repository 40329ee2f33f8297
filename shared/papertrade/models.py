"""The domain models of CONTRACT.md as msgspec Structs.

These are the shapes that move between cores and over NATS. Decimals are exact and travel as strings;
times are aware UTC datetimes and travel as ISO 8601. The broker's Alpaca REST shapes are views of
these, built in the broker.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from uuid import UUID

import msgspec

from papertrade.enums import (
    Interval,
    LiquiditySide,
    OrderStatus,
    OrderType,
    SelfTradePrevention,
    Side,
    TimeInForce,
)
from papertrade.money import ZERO


class Bar(msgspec.Struct, frozen=True, kw_only=True):
    """One OHLCV bar. `t` is the bar's open time in UTC (daily bars: the session date's midnight in New York)."""

    symbol: str
    interval: Interval
    t: datetime
    o: Decimal
    h: Decimal
    l: Decimal  # noqa: E741 - the wire name
    c: Decimal
    v: Decimal


class Order(msgspec.Struct, kw_only=True):
    """An order as the broker keeps it. `qty` xor `notional`; prices by type."""

    id: UUID
    client_order_id: str
    account_id: UUID
    symbol: str
    side: Side
    type: OrderType
    time_in_force: TimeInForce
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime
    qty: Decimal | None = None
    notional: Decimal | None = None
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    all_or_none: bool = False
    extended_hours: bool = False
    status: OrderStatus = OrderStatus.PENDING_NEW
    filled_qty: Decimal = ZERO
    filled_avg_price: Decimal | None = None
    filled_at: datetime | None = None
    canceled_at: datetime | None = None
    expired_at: datetime | None = None
    failed_at: datetime | None = None
    replaced_at: datetime | None = None
    replaced_by: UUID | None = None
    replaces: UUID | None = None
    reason: str | None = None


class Execution(msgspec.Struct, frozen=True, kw_only=True):
    """One fill of one order against one counter-order, at the resting order's price."""

    id: str
    order_id: UUID
    account_id: UUID
    symbol: str
    side: Side
    price: Decimal
    qty: Decimal
    liquidity: LiquiditySide
    t: datetime
    fee: Decimal = ZERO


class Position(msgspec.Struct, kw_only=True):
    """A signed position: `qty` > 0 long, < 0 short. `cost_basis` = qty * avg_entry_price (signed)."""

    account_id: UUID
    symbol: str
    qty: Decimal = ZERO
    avg_entry_price: Decimal = ZERO
    realized_pl: Decimal = ZERO

    @property
    def cost_basis(self) -> Decimal:
        return self.qty * self.avg_entry_price

    @property
    def side(self) -> Side:
        return Side.SELL if self.qty < 0 else Side.BUY


class Account(msgspec.Struct, kw_only=True):
    id: UUID
    name: str
    account_number: str
    cash: Decimal
    created_at: datetime
    currency: str = "USD"
    status: str = "ACTIVE"
    shorting_enabled: bool = True
    self_trade_prevention: SelfTradePrevention = SelfTradePrevention.NONE


__all__ = ["Account", "Bar", "Execution", "Interval", "Order", "Position"]
