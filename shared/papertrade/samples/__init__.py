"""Sample strategies shipped with papertrade (listed by the strategy-runner's `GET /v1/samples`).

| name | entrypoint | what it shows |
| --- | --- | --- |
| buy-and-hold | `papertrade.samples.buy_and_hold:BuyAndHold` | one market order per symbol, then nothing |
| sma-crossover | `papertrade.samples.sma_cross:SmaCross` | incremental indicators, market orders, positions |
| mean-reversion | `papertrade.samples.mean_reversion:MeanReversion` | resting GTC limit orders, cancel/replace |
| breakout-stop | `papertrade.samples.breakout_stop:BreakoutStop` | entries on breakouts, protective trailing stop orders |

Run one in a backtest:

    papertrade backtest papertrade.samples.sma_cross:SmaCross --symbols AAPL --start 2024-01-02 \\
        --end 2024-03-28 --interval 1m --params '{"fast": 10, "slow": 30}' --report out.html
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    name: str
    entrypoint: str
    description: str


def samples() -> list[Sample]:
    """The shipped samples, each described by its class's docstring."""
    from papertrade.strategy.loader import load_strategy_class

    out = []
    for name, entrypoint in _SAMPLES:
        cls = load_strategy_class(entrypoint)
        out.append(Sample(name, entrypoint, cls.describe()))
    return out


_SAMPLES = (
    ("buy-and-hold", "papertrade.samples.buy_and_hold:BuyAndHold"),
    ("sma-crossover", "papertrade.samples.sma_cross:SmaCross"),
    ("mean-reversion", "papertrade.samples.mean_reversion:MeanReversion"),
    ("breakout-stop", "papertrade.samples.breakout_stop:BreakoutStop"),
)
