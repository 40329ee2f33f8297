"""Backtest statistics, computed with pandas/numpy from the equity curve and the fills.

Definitions (risk-free rate 0; a year is 365.25 days of calendar time and 252 trading days):

- total_return: final equity / starting cash - 1 (from the ledger's exact figures).
- cagr: (final / start) ** (1 / years) - 1, years = (end - start) in calendar time.
- sharpe: mean / standard deviation (ddof 1) of daily returns * sqrt(252). Daily returns are the
  changes of the last equity of each New York trading date (the day before the first bar counts as
  the starting cash).
- sortino: mean daily return / downside deviation * sqrt(252); downside deviation =
  sqrt(mean(min(r, 0) ** 2)) over all daily returns.
- max_drawdown: the largest fall from a running peak of the per-bar equity curve, as a fraction (<= 0).
- win_rate: winning round trips / closed round trips (a round trip goes from flat to flat; a fill
  that flips the position closes one and opens the next). A round trip's P&L is the ledger's realised
  P&L of its closing fills minus every fee paid on it.
- exposure: the fraction of bars with an open position.
- turnover: traded notional (sum of |qty * price| of every fill) / mean equity.
- fees: the commissions paid (exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

from papertrade.backtest.engine import FillRecord
from papertrade.enums import Side
from papertrade.money import ZERO

TRADING_DAYS = 252
YEAR_SECONDS = 365.25 * 86400


@dataclass
class Trade:
    symbol: str
    side: str  # long | short
    qty: Decimal
    entry_time: datetime
    entry_price: Decimal
    exit_time: datetime | None = None
    exit_price: Decimal | None = None
    pnl: Decimal = ZERO
    fees: Decimal = ZERO
    _entry_notional: Decimal = ZERO
    _exit_qty: Decimal = ZERO
    _exit_notional: Decimal = ZERO

    @property
    def closed(self) -> bool:
        return self.exit_time is not None

    @property
    def return_pct(self) -> float | None:
        basis = self._entry_notional
        if not self.closed or basis == 0:
            return None
        return float(self.pnl / basis) * 100

    def row(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "side": self.side,
            "qty": self.qty,
            "entry_time": self.entry_time,
            "entry_price": self.entry_price,
            "exit_time": self.exit_time,
            "exit_price": self.exit_price,
            "pnl": self.pnl if self.closed else None,
            "fees": self.fees,
            "return_pct": self.return_pct,
        }


def round_trips(fills: list[FillRecord]) -> list[Trade]:
    """The round trips (flat to flat) the fills make, per symbol, in time order."""
    open_: dict[str, Trade] = {}
    pos: dict[str, Decimal] = {}
    out: list[Trade] = []
    for f in fills:
        before = pos.get(f.symbol, ZERO)
        signed = f.qty if f.side is Side.BUY else -f.qty
        after = before + signed
        pos[f.symbol] = after
        trade = open_.get(f.symbol)
        opening = f.qty
        if trade is not None and before != 0 and (signed > 0) != (before > 0):
            closing = min(f.qty, abs(before))
            opening = f.qty - closing
            trade._exit_qty += closing
            trade._exit_notional += closing * f.price
            trade.pnl += f.realized_pl - f.fee
            trade.fees += f.fee
            if after == 0 or (after > 0) != (before > 0):
                trade.exit_time = f.t
                trade.exit_price = trade._exit_notional / trade._exit_qty
                out.append(trade)
                del open_[f.symbol]
                trade = None
            fee_left = ZERO
        else:
            fee_left = f.fee
        if opening > 0:
            if trade is None:
                trade = open_[f.symbol] = Trade(
                    symbol=f.symbol,
                    side="long" if signed > 0 else "short",
                    qty=ZERO,
                    entry_time=f.t,
                    entry_price=f.price,
                )
            trade.qty += opening
            trade._entry_notional += opening * f.price
            trade.entry_price = trade._entry_notional / trade.qty
            trade.pnl -= fee_left
            trade.fees += fee_left
    out.extend(open_.values())
    out.sort(key=lambda t: (t.entry_time, t.symbol))
    return out


def compute(
    *,
    equity_t: np.ndarray,
    equity: np.ndarray,
    gross: np.ndarray,
    start: datetime | None,
    end: datetime | None,
    starting_cash: Decimal,
    final_equity: Decimal,
    fees: Decimal,
    fills: list[FillRecord],
    trades: list[Trade],
) -> dict[str, Any]:
    """Every figure of the report (see the module docstring)."""
    start_cash = float(starting_cash)
    total_return = float(final_equity / starting_cash - 1) if starting_cash else 0.0
    years = (end - start).total_seconds() / YEAR_SECONDS if start and end else 0.0
    growth = float(final_equity / starting_cash) if starting_cash else 0.0
    cagr = growth ** (1 / years) - 1 if years > 0 and growth > 0 else None
    curve = equity_series(equity_t, equity)
    daily = daily_returns(curve, start_cash)
    sharpe = _sharpe(daily)
    sortino = _sortino(daily)
    closed = [t for t in trades if t.closed]
    wins = sum(1 for t in closed if t.pnl > 0)
    n = len(equity)
    exposure = float(np.count_nonzero(gross > 0)) / n if n else 0.0
    traded = sum((f.qty * f.price for f in fills), ZERO)
    mean_equity = float(np.mean(equity)) if n else start_cash
    return {
        "start": start,
        "end": end,
        "starting_cash": starting_cash,
        "final_equity": final_equity,
        "total_return": total_return,
        "cagr": cagr,
        "sharpe": sharpe,
        "sortino": sortino,
        "max_drawdown": max_drawdown(equity, start_cash),
        "win_rate": wins / len(closed) if closed else None,
        "trades": len(closed),
        "exposure": exposure,
        "turnover": float(traded) / mean_equity if mean_equity else 0.0,
        "fees": fees,
        "fills": len(fills),
    }


def equity_series(equity_t: np.ndarray, equity: np.ndarray) -> pd.Series:
    """The per-bar equity as a Series on a UTC DatetimeIndex (bar close times)."""
    index = pd.DatetimeIndex(np.asarray(equity_t, dtype="int64").view("datetime64[ns]")).tz_localize("UTC")
    s = pd.Series(np.asarray(equity, dtype=np.float64), index=index, name="equity")
    # several symbols close at the same instant: keep the last mark of each instant
    return s[~s.index.duplicated(keep="last")]


def daily_returns(curve: pd.Series, start_cash: float) -> pd.Series:
    """Returns of the last equity of each New York date, the starting cash before the first."""
    if curve.empty:
        return pd.Series(dtype=np.float64)
    local = curve.tz_convert("America/New_York")
    days = local.groupby(pd.DatetimeIndex(local.index).date).last()
    values = np.concatenate([[start_cash], days.to_numpy(dtype=np.float64)])
    r = values[1:] / values[:-1] - 1
    return pd.Series(r, index=pd.Index(days.index, name="date"))


def max_drawdown(equity: np.ndarray, start_cash: float) -> float:
    """min(equity / running peak - 1), the starting cash being the first peak."""
    if len(equity) == 0:
        return 0.0
    values = np.concatenate([[start_cash], np.asarray(equity, dtype=np.float64)])
    peak = np.maximum.accumulate(values)
    return float(np.min(values / peak - 1))


def drawdown_series(curve: pd.Series, start_cash: float) -> pd.Series:
    peak = np.maximum.accumulate(np.maximum(curve.to_numpy(), start_cash))
    return pd.Series(curve.to_numpy() / peak - 1, index=curve.index, name="drawdown")


def _sharpe(r: pd.Series) -> float | None:
    if len(r) < 2:
        return None
    sd = float(r.std(ddof=1))
    if sd == 0 or math.isnan(sd):
        return None
    return float(r.mean()) / sd * math.sqrt(TRADING_DAYS)


def _sortino(r: pd.Series) -> float | None:
    if len(r) < 2:
        return None
    downside = math.sqrt(float(np.mean(np.minimum(r.to_numpy(), 0.0) ** 2)))
    if downside == 0:
        return None
    return float(r.mean()) / downside * math.sqrt(TRADING_DAYS)
