"""Breakout with a protective trailing stop: buy new highs, let a stop order take you out."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from decimal import ROUND_FLOOR, Decimal
from typing import Any, ClassVar
from uuid import UUID

from papertrade.instruments import instrument
from papertrade.messages import TradeUpdate
from papertrade.models import Bar
from papertrade.strategy import Strategy


class BreakoutStop(Strategy):
    """Buy `qty` at market when the close breaks above the highest high of the last `lookback` bars;
    once filled, protect the position with a GTC stop (sell) `stop_pct` under the best close since
    entry, raised (cancel, then a new stop) as the price climbs. The stop order is the only exit.

    Params: `lookback` (20 bars), `stop_pct` (0.02), `qty` (10).

    Stops trigger on the book's last trade price (as on an exchange): in a market where other
    accounts trade the symbol the stop follows their prints; against the synthetic maker alone, only
    trades make prints, so a stop fires when a trade happens at or through it.
    """

    params: ClassVar[dict[str, Any]] = {"lookback": 20, "stop_pct": 0.02, "qty": 10}

    def on_start(self) -> None:
        self._highs: dict[str, deque[Decimal]] = {}
        self._stops: dict[str, tuple[UUID, Decimal]] = {}
        self._best: dict[str, Decimal] = {}
        self._entering: set[str] = set()
        self._pct = Decimal(str(self.p.stop_pct))

    def on_bar(self, bar: Bar) -> None:
        highs = self._highs.setdefault(bar.symbol, deque(maxlen=self.p.lookback))
        breakout = len(highs) == self.p.lookback and bar.c > max(highs)
        highs.append(bar.h)
        qty = self.position(bar.symbol).qty
        if qty == 0:
            if breakout and bar.symbol not in self._entering:
                self._entering.add(bar.symbol)
                self.buy(bar.symbol, self.p.qty)
            return
        if qty > 0 and bar.c > self._best.get(bar.symbol, bar.c):
            self._best[bar.symbol] = bar.c
            self._protect(bar.symbol, qty)

    def on_fill(self, update: TradeUpdate) -> None:
        symbol = str(update.order.get("symbol", ""))
        if update.order.get("side") == "buy" and update.event == "fill":
            self._entering.discard(symbol)
            self._best[symbol] = Decimal(str(update.price))
            if update.position_qty is not None and update.position_qty > 0:
                self._protect(symbol, update.position_qty)
        elif update.order.get("side") == "sell" and update.event == "fill":
            self._stops.pop(symbol, None)
            self._best.pop(symbol, None)

    def on_order_update(self, update: TradeUpdate) -> None:
        symbol = str(update.order.get("symbol", ""))
        if update.event in ("canceled", "rejected", "expired") and update.order.get("side") == "buy":
            self._entering.discard(symbol)

    def _protect(self, symbol: str, qty: Decimal) -> None:
        tick = instrument(symbol).tick
        stop = (self._best[symbol] * (1 - self._pct) / tick).to_integral_value(rounding=ROUND_FLOOR) * tick
        current = self._stops.get(symbol)
        if current is not None:
            if stop <= current[1]:
                return
            self.cancel(current[0])
        order = self.sell(symbol, qty, type="stop", stop_price=stop, time_in_force="gtc")
        if order.status.is_open:
            self._stops[symbol] = (order.id, stop)

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        if params["lookback"] < 1:
            raise ValueError(f"lookback must be at least 1, got {params['lookback']}")
        if not 0 < params["stop_pct"] < 1:
            raise ValueError(f"stop_pct must be between 0 and 1, got {params['stop_pct']}")
        if params["qty"] <= 0:
            raise ValueError(f"qty must be positive, got {params['qty']}")
