"""The strategy SDK: write a strategy once, run it in a backtest, in the stack, or as a container.

    from papertrade import Strategy

    class BuyTheDip(Strategy):
        params = {"qty": 10, "drop": 0.02}

        def on_bar(self, bar):
            closes = self.history(bar.symbol, "1m", 30)[bar.symbol]["close"]
            if self.position(bar.symbol).qty == 0 and bar.c < closes.max() * (1 - self.p.drop):
                self.buy(bar.symbol, self.p.qty)

        def on_fill(self, update):
            print(update.event, update.order["symbol"], update.qty, "@", update.price)

- `Strategy` (base.py): callbacks, order methods and reads; `params` declares tunables.
- `StrategyContext` (context.py): the Protocol a strategy trades through. Implementations:
  `papertrade.backtest.BacktestContext` (pure cores in one process, bar time) and
  `papertrade.strategy.live.LiveContext` (the broker's REST API; bars and trade updates from NATS).
- `Driver` (driver.py): feeds one strategy its events, counts them, pauses it when a callback raises.
- `load_strategy_class` / `build_strategy` (loader.py): `package.module:Class` entrypoints.
"""

from papertrade.strategy.base import Params, ParamsError, Strategy, StrategyNotBound
from papertrade.strategy.context import AccountSnapshot, OrderRequest, StrategyContext
from papertrade.strategy.driver import Driver, State
from papertrade.strategy.loader import StrategyLoadError, build_strategy, load_strategy_class

__all__ = [
    "AccountSnapshot",
    "Driver",
    "OrderRequest",
    "Params",
    "ParamsError",
    "State",
    "Strategy",
    "StrategyContext",
    "StrategyLoadError",
    "StrategyNotBound",
    "build_strategy",
    "load_strategy_class",
]
