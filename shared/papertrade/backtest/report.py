"""A backtest's result: figures, trades and fills tables, and a self-contained HTML report (plotly)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from papertrade.backtest import metrics
from papertrade.backtest.engine import BacktestConfig, Backtester, RawResult
from papertrade.bars.series import BarSeries
from papertrade.strategy.base import Strategy
from papertrade.strategy.loader import build_strategy

#: At most this many points per plotted line (long runs are thinned for the browser).
MAX_POINTS = 5000


@dataclass
class BacktestResult:
    raw: RawResult
    stats: dict[str, Any]
    trades: pd.DataFrame
    fills: pd.DataFrame
    equity: pd.Series
    drawdown: pd.Series

    @property
    def error(self) -> str | None:
        return self.raw.error

    @classmethod
    def from_raw(cls, raw: RawResult) -> BacktestResult:
        trades = metrics.round_trips(raw.fills)
        stats = metrics.compute(
            equity_t=raw.equity_t,
            equity=raw.equity,
            gross=raw.exposure,
            start=raw.start,
            end=raw.end,
            starting_cash=raw.starting_cash,
            final_equity=raw.final_equity,
            fees=raw.fees,
            fills=raw.fills,
            trades=trades,
        )
        curve = metrics.equity_series(raw.equity_t, raw.equity)
        fills = pd.DataFrame(
            [
                {
                    "time": f.t,
                    "symbol": f.symbol,
                    "side": f.side.value,
                    "qty": f.qty,
                    "price": f.price,
                    "fee": f.fee,
                    "liquidity": f.liquidity,
                    "position_qty": f.position_qty,
                    "realized_pl": f.realized_pl,
                    "order_id": str(f.order_id),
                    "execution_id": f.execution_id,
                }
                for f in raw.fills
            ],
            columns=[
                "time",
                "symbol",
                "side",
                "qty",
                "price",
                "fee",
                "liquidity",
                "position_qty",
                "realized_pl",
                "order_id",
                "execution_id",
            ],
        )
        trade_table = pd.DataFrame(
            [t.row() for t in trades],
            columns=[
                "symbol",
                "side",
                "qty",
                "entry_time",
                "entry_price",
                "exit_time",
                "exit_price",
                "pnl",
                "fees",
                "return_pct",
            ],
        )
        return cls(
            raw=raw,
            stats=stats,
            trades=trade_table,
            fills=fills,
            equity=curve,
            drawdown=metrics.drawdown_series(curve, float(raw.starting_cash)),
        )

    # --- output ------------------------------------------------------------------------------------

    def summary(self) -> list[tuple[str, str]]:
        """(label, value) rows of the headline figures, formatted for people."""
        s = self.stats
        rows = [
            ("strategy", self.raw.strategy),
            ("params", str(self.raw.params)),
            ("symbols", ", ".join(self.raw.symbols)),
            ("interval", self.raw.interval.value),
            ("period", f"{_t(s['start'])} .. {_t(s['end'])}"),
            ("bars", f"{self.raw.bars:,}"),
            ("starting cash", f"{s['starting_cash']:,.2f}"),
            ("final equity", f"{s['final_equity']:,.2f}"),
            ("total return", _pct(s["total_return"])),
            ("CAGR", _pct(s["cagr"])),
            ("Sharpe", _num(s["sharpe"])),
            ("Sortino", _num(s["sortino"])),
            ("max drawdown", _pct(s["max_drawdown"])),
            ("win rate", _pct(s["win_rate"])),
            ("round trips", f"{s['trades']:,}"),
            ("fills", f"{s['fills']:,}"),
            ("exposure", _pct(s["exposure"])),
            ("turnover", f"{s['turnover']:.2f}x"),
            ("fees", f"{s['fees']:,.2f}"),
            ("status", self.raw.state + (f" ({self.raw.error})" if self.raw.error else "")),
            (
                "run time",
                f"{self.raw.elapsed_s:.2f} s ({self.raw.bars / max(self.raw.elapsed_s, 1e-9):,.0f} bars/s)",
            ),
        ]
        return rows

    def to_html(self) -> str:
        """The whole report as one HTML page (plotly included inline: it opens offline)."""
        figure = self._figure()
        plot = figure.to_html(full_html=False, include_plotlyjs=True)
        summary = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in self.summary()
        )
        trades = self.trades.to_html(
            index=False, classes="table", na_rep="", float_format=lambda x: f"{x:.2f}"
        )
        error = ""
        if self.raw.error:
            error = f"<h2>Error</h2><pre>{html.escape(self.raw.traceback or self.raw.error)}</pre>"
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>Backtest {html.escape(self.raw.strategy)}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "th,td{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}"
            "pre{background:#f6f6f6;padding:1em}</style></head><body>"
            f"<h1>Backtest: {html.escape(self.raw.strategy)}</h1>"
            f"<table class='summary'>{summary}</table>{error}"
            f"<h2>Equity, drawdown and trades</h2>{plot}"
            f"<h2>Round trips ({len(self.trades)})</h2>{trades}"
            "</body></html>"
        )

    def write_html(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.to_html(), encoding="utf-8")
        return out

    def _figure(self) -> Any:
        from plotly.subplots import make_subplots

        symbols = list(self.raw.symbols)
        rows = len(symbols) + 2
        heights = [0.5 / len(symbols)] * len(symbols) + [0.3, 0.2]
        fig = make_subplots(
            rows=rows,
            cols=1,
            shared_xaxes=True,
            vertical_spacing=0.03,
            row_heights=heights,
            subplot_titles=[f"{s} price" for s in symbols] + ["equity", "drawdown"],
        )
        for i, symbol in enumerate(symbols, start=1):
            series = self.raw.prices[symbol]
            x, y = _thin(_index(series.t), series.c)
            fig.add_scatter(x=x, y=y, name=f"{symbol} close", line={"width": 1}, row=i, col=1)
            fills = self.fills[self.fills["symbol"] == symbol] if len(self.fills) else self.fills
            for side, color, marker in (("buy", "green", "triangle-up"), ("sell", "red", "triangle-down")):
                part = fills[fills["side"] == side] if len(fills) else fills
                if len(part):
                    fig.add_scatter(
                        x=pd.to_datetime(part["time"], utc=True),
                        y=[float(p) for p in part["price"]],
                        mode="markers",
                        name=f"{symbol} {side}",
                        marker={"color": color, "symbol": marker, "size": 8},
                        row=i,
                        col=1,
                    )
        ex, ey = _thin(self.equity.index, self.equity.to_numpy())
        fig.add_scatter(x=ex, y=ey, name="equity", line={"width": 1.5}, row=rows - 1, col=1)
        dx, dy = _thin(self.drawdown.index, self.drawdown.to_numpy() * 100)
        fig.add_scatter(
            x=dx, y=dy, name="drawdown %", fill="tozeroy", line={"color": "firebrick"}, row=rows, col=1
        )
        fig.update_layout(height=300 * rows, showlegend=True, margin={"l": 40, "r": 20, "t": 40, "b": 20})
        return fig


def run_backtest(
    strategy: str | type[Strategy] | Strategy,
    data: Mapping[str, BarSeries] | Sequence[BarSeries],
    *,
    params: Mapping[str, Any] | None = None,
    cash: Decimal | str | int = Decimal("100000"),
    config: BacktestConfig | None = None,
    progress: bool = False,
) -> BacktestResult:
    """Backtest `strategy` (an entrypoint `package.module:Class`, a class or an instance) over `data`."""
    if isinstance(strategy, Strategy):
        instance = strategy
    elif isinstance(strategy, str):
        instance = build_strategy(strategy, params)
    else:
        if not (isinstance(strategy, type) and issubclass(strategy, Strategy)):
            raise TypeError(f"not a Strategy: {strategy!r}")
        instance = strategy(params)
    cfg = config or BacktestConfig(cash=Decimal(str(cash)))
    tester = Backtester(instance, data, cfg)
    if progress:
        from tqdm import tqdm

        total = sum(len(s) for s in tester.series.values())
        with tqdm(total=total, unit="bar", unit_scale=True, desc="backtest", leave=False) as bar:
            raw = tester.run(progress=bar.update)
    else:
        raw = tester.run()
    return BacktestResult.from_raw(raw)


def _index(t: np.ndarray) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(np.asarray(t, dtype="int64").view("datetime64[ns]")).tz_localize("UTC")


def _thin(x: Any, y: np.ndarray) -> tuple[Any, np.ndarray]:
    n = len(y)
    if n <= MAX_POINTS:
        return x, y
    step = int(np.ceil(n / MAX_POINTS))
    return x[::step], y[::step]


def _t(value: Any) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
