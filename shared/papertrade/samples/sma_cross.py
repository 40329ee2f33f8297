"""SMA crossover: long when the fast average crosses above the slow one, flat when it crosses below."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

from papertrade.models import Bar
from papertrade.strategy import Strategy


class SmaCross(Strategy):
    """Buy `qty` when SMA(fast) crosses above SMA(slow) while flat; close when it crosses below.

    Params: `fast` (10), `slow` (30), `qty` (100). The averages are updated incrementally per bar,
    and a cross is judged against the last non-zero difference (as backtrader's CrossOver does), so
    a tie never counts as a cross.
    """

    params: ClassVar[dict[str, Any]] = {"fast": 10, "slow": 30, "qty": 100}

    def on_start(self) -> None:
        self._state: dict[str, _Sma] = {s: _Sma(self.p.fast, self.p.slow) for s in self.symbols}

    def on_bar(self, bar: Bar) -> None:
        state = self._state.get(bar.symbol)
        if state is None:
            state = self._state[bar.symbol] = _Sma(self.p.fast, self.p.slow)
        cross = state.push(bar.c)
        if cross > 0:
            if self.position(bar.symbol).qty == 0:
                self.buy(bar.symbol, self.p.qty)
        elif cross < 0:
            qty = self.position(bar.symbol).qty
            if qty > 0:
                self.sell(bar.symbol, qty)

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        if not 0 < params["fast"] < params["slow"]:
            raise ValueError(f"need 0 < fast < slow, got fast={params['fast']} slow={params['slow']}")
        if params["qty"] <= 0:
            raise ValueError(f"qty must be positive, got {params['qty']}")


class _Sma:
    """Running sums of the last `fast` and `slow` closes; `push` answers +1 / -1 on a cross, else 0.

    The sums are floats (a signal, not money) kept incremental like any streaming indicator, and
    recomputed exactly from the window every `_RESUM` bars so rounding never drifts.
    """

    __slots__ = ("buf", "fast", "last_sign", "n", "slow", "sum_fast", "sum_slow")

    def __init__(self, fast: int, slow: int) -> None:
        self.fast = fast
        self.slow = slow
        self.buf: deque[float] = deque(maxlen=slow + 1)
        self.sum_fast = 0.0
        self.sum_slow = 0.0
        self.last_sign = 0
        self.n = 0

    def push(self, close: Decimal) -> int:
        c = float(close)
        buf = self.buf
        buf.append(c)
        n = len(buf)
        count = self.n + 1
        self.n = count
        fast = self.fast
        slow = self.slow
        if count % _RESUM == 0:
            items = list(buf)
            sum_fast = math.fsum(items[-fast:])
            sum_slow = math.fsum(items[-slow:])
        else:
            sum_fast = self.sum_fast + c
            sum_slow = self.sum_slow + c
            if n > fast:
                sum_fast -= buf[-1 - fast]
            if n > slow:
                sum_slow -= buf[0]
        self.sum_fast = sum_fast
        self.sum_slow = sum_slow
        if n < slow:
            return 0
        diff = sum_fast / fast - sum_slow / slow
        if diff > 0:
            sign = 1
        elif diff < 0:
            sign = -1
        else:
            return 0
        last = self.last_sign
        if last == sign:
            return 0
        self.last_sign = sign
        return 0 if last == 0 else sign


_RESUM = 4096
