"""Buy and hold: the benchmark every other strategy has to beat."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from papertrade.models import Bar
from papertrade.strategy import Strategy


class BuyAndHold(Strategy):
    """Buy `qty` shares of every symbol at its first bar and hold them to the end.

    Params: `qty` (shares per symbol, default 100).
    """

    params: ClassVar[dict[str, Any]] = {"qty": 100}

    def on_start(self) -> None:
        self._bought: set[str] = set()

    def on_bar(self, bar: Bar) -> None:
        if bar.symbol in self._bought:
            return
        self._bought.add(bar.symbol)
        if self.position(bar.symbol).qty == 0:
            self.buy(bar.symbol, self.p.qty)

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        if params["qty"] <= 0:
            raise ValueError(f"qty must be positive, got {params['qty']}")
