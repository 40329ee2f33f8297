"""The deterministic strategy the end-to-end test deploys (importable as tests.e2e.strategies)."""

from __future__ import annotations

from decimal import ROUND_DOWN, Decimal
from typing import Any, ClassVar

from papertrade.enums import OrderType, Side, TimeInForce
from papertrade.messages import TradeUpdate
from papertrade.models import Bar
from papertrade.strategy import Strategy

CENT = Decimal("0.01")


class PingPong(Strategy):
    """Trades on every bar, so the end-to-end run sees orders, fills and trade updates quickly.

    - `liquid` symbol (synthetic liquidity on): market buy `qty` * 2 on odd bars, market sell `qty`
      on even bars (the position grows by `qty` every two bars; sells realise P&L).
    - `quiet` symbol (liquidity off): keeps one GTC limit buy of `qty` resting at the bar's close,
      for a second account to sell into.
    """

    params: ClassVar[dict[str, Any]] = {"liquid": "", "quiet": "", "qty": 1}

    def on_start(self) -> None:
        self.n = 0
        self.updates = 0

    def on_bar(self, bar: Bar) -> None:
        qty = Decimal(self.p.qty)
        if bar.symbol == self.p.liquid:
            self.n += 1
            if self.n % 2:
                self.buy(bar.symbol, qty * 2)
            else:
                self.sell(bar.symbol, qty)
        elif bar.symbol == self.p.quiet and not any(o.symbol == bar.symbol for o in self.open_orders()):
            price = bar.c.quantize(CENT, rounding=ROUND_DOWN)
            self.order(
                bar.symbol,
                Side.BUY,
                qty,
                type=OrderType.LIMIT,
                time_in_force=TimeInForce.GTC,
                limit_price=price,
            )

    def on_order_update(self, update: TradeUpdate) -> None:
        self.updates += 1
