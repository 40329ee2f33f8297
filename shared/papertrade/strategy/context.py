"""The context a strategy trades through: one Protocol, two implementations.

`papertrade.backtest.BacktestContext` wires the pure cores (book, ledger, risk) in one process in bar
time; `papertrade.strategy.live.LiveContext` talks to the broker's REST API and reads market data the
runner received from NATS. A `Strategy` only ever calls the methods below, so the same class runs
unchanged in both.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

import msgspec

from papertrade.enums import OrderStatus, OrderType, Side, TimeInForce
from papertrade.models import Order, Position

if TYPE_CHECKING:
    import pandas as pd


class OrderRequest(msgspec.Struct, frozen=True, kw_only=True):
    """An order as a strategy asks for it (validated by `Strategy.order` before it reaches a context)."""

    symbol: str
    side: Side
    type: OrderType = OrderType.MARKET
    time_in_force: TimeInForce = TimeInForce.DAY
    qty: Decimal | None = None
    notional: Decimal | None = None
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    client_order_id: str | None = None
    all_or_none: bool = False
    extended_hours: bool = False

    def to_order(
        self,
        *,
        id: UUID,
        client_order_id: str,
        account_id: UUID,
        now: datetime,
        status: OrderStatus,
        reason: str | None = None,
    ) -> Order:
        """The Order this request becomes at `now` (backtest and live build it the same way)."""
        return Order(
            id=id,
            client_order_id=client_order_id,
            account_id=account_id,
            symbol=self.symbol,
            side=self.side,
            type=self.type,
            time_in_force=self.time_in_force,
            created_at=now,
            updated_at=now,
            submitted_at=now,
            qty=self.qty,
            notional=self.notional,
            limit_price=self.limit_price,
            stop_price=self.stop_price,
            all_or_none=self.all_or_none,
            extended_hours=self.extended_hours,
            status=status,
            reason=reason,
            failed_at=now if status is OrderStatus.REJECTED else None,
        )


class AccountSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The account as a strategy reads it: exact decimals, in the account's currency."""

    cash: Decimal
    equity: Decimal
    buying_power: Decimal
    long_market_value: Decimal
    short_market_value: Decimal
    fees: Decimal = Decimal(0)
    realized_pl: Decimal = Decimal(0)


class StrategyContext(Protocol):
    """What a strategy can do and see. Implementations never raise for a refused order: they return
    the order with status `rejected` and a reason, and deliver a `rejected` trade update after the
    current callback."""

    def now(self) -> datetime:
        """Simulation time: the end of the latest bar seen (live: the streamer's time)."""
        ...

    def submit(self, request: OrderRequest) -> Order:
        """Send an order; the answer is the order as the broker acknowledged (or rejected) it."""
        ...

    def cancel(self, order_id: UUID) -> None: ...

    def cancel_all(self) -> None: ...

    def close_all(self) -> list[Order]:
        """Cancel open orders, then flatten every position with market orders."""
        ...

    def position(self, symbol: str) -> Position:
        """The signed position (qty 0 when flat)."""
        ...

    def positions(self) -> list[Position]: ...

    def account(self) -> AccountSnapshot: ...

    def open_orders(self) -> list[Order]: ...

    def history(self, symbol: str, interval: str, n: int) -> pd.DataFrame:
        """The last `n` bars up to now, as the CONTRACT.md DataFrame."""
        ...
