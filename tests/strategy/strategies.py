"""Strategies the tests deploy and backtest (importable as tests.strategy.strategies)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any, ClassVar

from papertrade.messages import TradeUpdate
from papertrade.models import Bar
from papertrade.strategy import Strategy


class Recorder(Strategy):
    """Records every callback; buys `qty` on the bars listed in `buy_on` (1-based counts)."""

    params: ClassVar[dict[str, Any]] = {"buy_on": [], "sell_on": [], "qty": 1}
    period = timedelta(minutes=5)

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.calls: list[tuple[Any, ...]] = []
        self.n = 0

    def on_start(self) -> None:
        self.calls.append(("start",))

    def on_bar(self, bar: Bar) -> None:
        self.n += 1
        self.calls.append(("bar", bar.symbol, bar.t))
        if self.n in self.p.buy_on:
            self.buy(bar.symbol, self.p.qty)
        if self.n in self.p.sell_on:
            self.sell(bar.symbol, self.p.qty)

    def on_fill(self, update: TradeUpdate) -> None:
        self.calls.append(("fill", update.event, update.qty, update.price, update.position_qty))

    def on_order_update(self, update: TradeUpdate) -> None:
        self.calls.append(("update", update.event, update.order["status"]))

    def on_periodic(self) -> None:
        self.calls.append(("periodic", self.now()))

    def on_stop(self) -> None:
        self.calls.append(("stop",))


class BuyEveryBar(Strategy):
    """Sends a 1-share market buy on every bar (to count orders in the live runner)."""

    def on_bar(self, bar: Bar) -> None:
        self.buy(bar.symbol, 1)


class Explodes(Strategy):
    """Raises on its second bar."""

    def on_start(self) -> None:
        self.n = 0

    def on_bar(self, bar: Bar) -> None:
        self.n += 1
        if self.n == 2:
            raise RuntimeError("boom on bar 2")


class NotAStrategy:
    pass


class ParityProbe(Strategy):
    """Fixed actions at fixed bar minutes (the same in a backtest and in the stack): market buys and
    sells, a resting limit that the moving market fills, a cancel and a close-all."""

    def on_start(self) -> None:
        self.resting: Any = None

    def on_bar(self, bar: Bar) -> None:
        m = bar.t.minute
        if m == 33:
            self.buy(bar.symbol, 10)
        elif m == 35:
            self.buy(bar.symbol, 150)  # walks two levels of the maker's asks
        elif m == 38:
            self.sell(bar.symbol, 60)
        elif m == 40:
            self.resting = self.buy(
                bar.symbol, 20, type="limit", limit_price=bar.c - Decimal("0.05"), time_in_force="gtc"
            )
            self.buy(bar.symbol, 5, type="limit", limit_price=bar.c - Decimal("3"), time_in_force="gtc")
        elif m == 47:
            self.cancel_all()
        elif m == 49:
            self.close_all()
