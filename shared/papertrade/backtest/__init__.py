"""The backtester: one strategy, bars of one or more symbols, the pure cores of the stack, bar time.

    from papertrade.backtest import run_backtest
    from papertrade.bars.synthetic import generate

    bars = generate("AAPL", start, end, seed=1)                      # or a CSV / Parquet loader
    result = run_backtest("papertrade.samples.sma_cross:SmaCross", [bars], params={"fast": 10})
    result.stats["sharpe"], result.trades, result.fills
    result.write_html("report.html")                                 # equity, drawdown, marks on price

- `engine.Backtester` / `engine.BacktestContext`: the replay and the simulated broker + exchange
  (matching engine `papertrade.book`, liquidity model `papertrade.book.liquidity`, ledger
  `papertrade.ledger`, risk rules `papertrade.risk`). Deterministic: same inputs, identical fills.
- `metrics`: total return, CAGR, Sharpe, Sortino, max drawdown, win rate, exposure, turnover, fees;
  round-trip trades.
- `report`: `BacktestResult` (figures + tables) and its HTML report (plotly).
- `data`: bars for a run: the synthetic market, or real files (CSV / Parquet).
"""

from papertrade.backtest.engine import (
    BACKTEST_ACCOUNT_ID,
    BacktestConfig,
    BacktestContext,
    Backtester,
    FillRecord,
    RawResult,
)
from papertrade.backtest.liquidity import LiquidityConfig
from papertrade.backtest.report import BacktestResult, run_backtest

__all__ = [
    "BACKTEST_ACCOUNT_ID",
    "BacktestConfig",
    "BacktestContext",
    "BacktestResult",
    "Backtester",
    "FillRecord",
    "LiquidityConfig",
    "RawResult",
    "run_backtest",
]
