"""The driver: delivers events to one strategy, counts them, and pauses it when a callback raises.

Both the backtester and the live runner feed a strategy through a `Driver`, so callback order, error
handling and `on_periodic` scheduling are the same code in both.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING
from uuid import UUID

from papertrade.enums import Interval
from papertrade.messages import TradeUpdate
from papertrade.models import Bar, Order, Position
from papertrade.strategy.base import Strategy
from papertrade.strategy.context import AccountSnapshot, OrderRequest, StrategyContext
from papertrade.timeutil import EPOCH

if TYPE_CHECKING:
    import pandas as pd

FILL_EVENTS = frozenset({"fill", "partial_fill"})


class State(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"


class Driver:
    """Runs one strategy against one context. Not thread-safe: feed it from one thread."""

    def __init__(
        self,
        strategy: Strategy,
        ctx: StrategyContext,
        symbols: tuple[str, ...],
        interval: Interval,
        *,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.ctx = _CountingContext(ctx)
        self.symbols = symbols
        self.interval = interval
        self.on_error = on_error
        self.state = State.STOPPED
        self.bars_seen = 0
        self.fills = 0
        self.last_error: str | None = None
        self.last_traceback: str | None = None
        self.started = False
        self._period = type(strategy).period
        self._next_periodic: datetime | None = None
        strategy.bind(self.ctx, symbols, interval)

    @property
    def orders_sent(self) -> int:
        return self.ctx.orders_sent

    @property
    def running(self) -> bool:
        return self.state is State.RUNNING

    def start(self) -> bool:
        """Call `on_start` (once per driver); False if it raised (the strategy is then paused)."""
        self.state = State.RUNNING
        if self.started:
            return True
        self.started = True
        return self._call(self.strategy.on_start)

    def bar(self, bar: Bar) -> None:
        """Deliver one closed bar (and `on_periodic` when a period of bar time has passed)."""
        if self.state is not State.RUNNING:
            return
        self.bars_seen += 1
        try:
            self.strategy.on_bar(bar)
        except Exception as exc:
            self._failed("on_bar", exc)
            return
        if self._period is not None:
            self._maybe_periodic(bar.t + bar.interval.delta)

    def update(self, update: TradeUpdate) -> None:
        """Deliver one trade update: `on_order_update`, and `on_fill` first for fills."""
        if update.event in FILL_EVENTS:
            self.fills += 1
        if self.state is not State.RUNNING:
            return
        if update.event in FILL_EVENTS and not self._call(self.strategy.on_fill, update):
            return
        self._call(self.strategy.on_order_update, update)

    def stop(self) -> None:
        """Call `on_stop` if the strategy is running; it ends `stopped` (or `error` if it was paused)."""
        if self.state is State.RUNNING:
            self._call(self.strategy.on_stop)
        if self.state is State.RUNNING:
            self.state = State.STOPPED

    def pause(self) -> None:
        if self.state is State.RUNNING:
            self.state = State.STOPPED

    def resume(self) -> None:
        """Run again after a stop or an error (the error stays in `last_error` until the next one)."""
        self.state = State.RUNNING

    # --- internals -------------------------------------------------------------------------------

    def _call(self, fn: Callable[..., None], *args: object) -> bool:
        try:
            fn(*args)
        except Exception as exc:
            self._failed(getattr(fn, "__name__", "callback"), exc)
            return False
        return True

    def _failed(self, where: str, exc: BaseException) -> None:
        self.state = State.ERROR
        self.last_error = f"{where}: {type(exc).__name__}: {exc}"
        self.last_traceback = "".join(traceback.format_exception(exc))
        if self.on_error is not None:
            self.on_error(self.last_error, self.last_traceback)

    def _maybe_periodic(self, now: datetime) -> None:
        period = self._period
        assert period is not None
        due = self._next_periodic
        if due is None:
            self._next_periodic = _next_boundary(now, period)
            return
        if now >= due:
            self._next_periodic = _next_boundary(now, period)
            self._call(self.strategy.on_periodic)


class _CountingContext:
    """Forwards to the real context and counts the orders sent."""

    def __init__(self, inner: StrategyContext) -> None:
        self.inner = inner
        self.orders_sent = 0

    def now(self) -> datetime:
        return self.inner.now()

    def submit(self, request: OrderRequest) -> Order:
        self.orders_sent += 1
        return self.inner.submit(request)

    def cancel(self, order_id: UUID) -> None:
        self.inner.cancel(order_id)

    def cancel_all(self) -> None:
        self.inner.cancel_all()

    def close_all(self) -> list[Order]:
        orders = self.inner.close_all()
        self.orders_sent += len(orders)
        return orders

    def position(self, symbol: str) -> Position:
        return self.inner.position(symbol)

    def positions(self) -> list[Position]:
        return self.inner.positions()

    def account(self) -> AccountSnapshot:
        return self.inner.account()

    def open_orders(self) -> list[Order]:
        return self.inner.open_orders()

    def history(self, symbol: str, interval: str, n: int) -> pd.DataFrame:
        return self.inner.history(symbol, interval, n)


def _next_boundary(now: datetime, period: timedelta) -> datetime:
    """The first multiple of `period` since the epoch strictly after `now`."""
    step = period.total_seconds()
    k = int((now - EPOCH).total_seconds() // step) + 1
    return EPOCH + timedelta(seconds=k * step)
