"""Mean reversion with resting limit orders: bid below the band, offer back at the mean."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any, ClassVar
from uuid import UUID

from papertrade.instruments import instrument
from papertrade.messages import TradeUpdate
from papertrade.models import Bar
from papertrade.strategy import Strategy


class MeanReversion(Strategy):
    """Rest a GTC limit buy `k` standard deviations under the moving average; once long, rest a limit
    sell at the average. Orders are re-priced (cancel, then a new order) when the band moves.

    Params: `window` (20 bars), `k` (2.0), `qty` (10).
    """

    params: ClassVar[dict[str, Any]] = {"window": 20, "k": 2.0, "qty": 10}

    def on_start(self) -> None:
        self._closes: dict[str, deque[Decimal]] = {}
        self._working: dict[str, UUID] = {}
        self._k = Decimal(str(self.p.k))

    def on_bar(self, bar: Bar) -> None:
        closes = self._closes.setdefault(bar.symbol, deque(maxlen=self.p.window))
        closes.append(bar.c)
        if len(closes) < self.p.window:
            return
        n = Decimal(len(closes))
        mean = sum(closes, Decimal(0)) / n
        var = sum(((c - mean) ** 2 for c in closes), Decimal(0)) / n
        std = var.sqrt()
        tick = instrument(bar.symbol).tick
        working = self._working.pop(bar.symbol, None)
        if working is not None:
            self.cancel(working)
        qty = self.position(bar.symbol).qty
        if qty > 0:
            price = (mean / tick).to_integral_value(rounding=ROUND_CEILING) * tick
            order = self.sell(bar.symbol, qty, type="limit", limit_price=price, time_in_force="gtc")
        elif qty == 0 and std > 0:
            price = ((mean - self._k * std) / tick).to_integral_value(rounding=ROUND_FLOOR) * tick
            if price <= 0:
                return
            order = self.buy(bar.symbol, self.p.qty, type="limit", limit_price=price, time_in_force="gtc")
        else:
            return
        if order.status.is_open:
            self._working[bar.symbol] = order.id

    def on_order_update(self, update: TradeUpdate) -> None:
        if update.event in ("fill", "canceled", "rejected", "expired"):
            symbol = update.order.get("symbol", "")
            if self._working.get(symbol) == UUID(str(update.order["id"])):
                del self._working[symbol]

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        if params["window"] < 2:
            raise ValueError(f"window must be at least 2, got {params['window']}")
        if params["k"] < 0:
            raise ValueError(f"k must not be negative, got {params['k']}")
        if params["qty"] <= 0:
            raise ValueError(f"qty must be positive, got {params['qty']}")
