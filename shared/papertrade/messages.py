"""Message bodies on the NATS subjects of CONTRACT.md (see `papertrade.bus.subjects`).

Every body is JSON encoded with msgspec (`papertrade.codec`). Commands on `ex.cmd.<symbol>` are a
tagged union on `cmd`. Additions must stay backward compatible: new fields get defaults.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

import msgspec

from papertrade.enums import (
    ExecType,
    LiquiditySide,
    OrderType,
    SelfTradePrevention,
    Side,
    TimeInForce,
)

# md.bar.<interval>.<symbol> carries papertrade.models.Bar.


# --- ex.cmd.<symbol>: broker -> orderbook ----------------------------------------------------------


class NewOrderCmd(msgspec.Struct, frozen=True, kw_only=True, tag="new", tag_field="cmd"):
    order_id: UUID
    account_id: UUID
    symbol: str
    side: Side
    type: OrderType
    time_in_force: TimeInForce
    t: datetime
    qty: Decimal | None = None
    notional: Decimal | None = None
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    all_or_none: bool = False
    stp: SelfTradePrevention = SelfTradePrevention.NONE


class CancelCmd(msgspec.Struct, frozen=True, kw_only=True, tag="cancel", tag_field="cmd"):
    order_id: UUID
    account_id: UUID
    symbol: str
    t: datetime
    reason: str | None = None


class ReplaceCmd(msgspec.Struct, frozen=True, kw_only=True, tag="replace", tag_field="cmd"):
    """Replace `order_id` by `new_order_id`. `qty` is the new total quantity (Alpaca's meaning)."""

    order_id: UUID
    new_order_id: UUID
    account_id: UUID
    symbol: str
    t: datetime
    qty: Decimal | None = None
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    time_in_force: TimeInForce | None = None


Command = NewOrderCmd | CancelCmd | ReplaceCmd


# --- ex.exec.<symbol>: orderbook -> broker ---------------------------------------------------------


class ExecReport(msgspec.Struct, frozen=True, kw_only=True):
    """One execution report. `seq` orders the reports of one symbol's book (strictly increasing).

    - accepted: the book acknowledged the order (it is working, or dormant if a stop).
    - fill: `exec_id`, `price`, `qty`, `liquidity`, `cum_qty`, `leaves_qty`; one per maker matched.
    - canceled / expired / rejected: `reason` says why; `leaves_qty` what was left unfilled.
    - triggered: a stop's condition held and it became a market/limit order.
    - replaced: `order_id` was replaced by `new_order_id` (which keeps queue priority iff only qty fell).
    """

    exec: ExecType
    seq: int
    order_id: UUID
    account_id: UUID
    symbol: str
    side: Side
    t: datetime
    exec_id: str | None = None
    price: Decimal | None = None
    qty: Decimal | None = None
    cum_qty: Decimal | None = None
    leaves_qty: Decimal | None = None
    liquidity: LiquiditySide | None = None
    counter_order_id: UUID | None = None
    new_order_id: UUID | None = None
    reason: str | None = None
    #: On `rejected`: the command refused ("new", "cancel" or "replace"). A rejected cancel or
    #: replace leaves the order as it was (e.g. it had already filled).
    command: str | None = None


# --- ex.trade.<symbol> / ex.quote.<symbol>: orderbook -> all ---------------------------------------


class TradePrint(msgspec.Struct, frozen=True, kw_only=True):
    symbol: str
    price: Decimal
    qty: Decimal
    t: datetime
    aggressor_side: Side
    execution_id: str


class Quote(msgspec.Struct, frozen=True, kw_only=True):
    symbol: str
    t: datetime
    bid: Decimal | None = None
    bid_size: Decimal | None = None
    ask: Decimal | None = None
    ask_size: Decimal | None = None
    last: Decimal | None = None


# --- risk.check: broker -> risk (request/reply) ----------------------------------------------------


class RiskCheckRequest(msgspec.Struct, frozen=True, kw_only=True):
    order_id: UUID
    account_id: UUID
    symbol: str
    side: Side
    type: OrderType
    time_in_force: TimeInForce
    t: datetime
    qty: Decimal | None = None
    notional: Decimal | None = None
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    #: For a replace: the order it replaces (its open exposure is released by the new one).
    replaces: UUID | None = None


class RiskDecision(msgspec.Struct, frozen=True, kw_only=True):
    """`approve` (qty unchanged), `clip` (`qty` is the reduced quantity) or `reject` (`reason`, `rule`)."""

    decision: Literal["approve", "clip", "reject"]
    qty: Decimal | None = None
    #: For a clipped notional order: the reduced notional (then `qty` is None).
    notional: Decimal | None = None
    reason: str | None = None
    rule: str | None = None
    #: True when the reject is a rate limit (the broker answers 429, else 403).
    throttled: bool = False


# --- broker.event.<account_id>: broker -> strategies -----------------------------------------------


class TradeUpdate(msgspec.Struct, kw_only=True, omit_defaults=False):
    """Alpaca's trade_update: event in new, fill, partial_fill, canceled, expired, rejected, replaced, ..."""

    event: str
    order: dict[str, Any]
    timestamp: datetime
    price: Decimal | None = None
    qty: Decimal | None = None
    execution_id: str | None = None
    position_qty: Decimal | None = None
