"""The DataFrame rule of CONTRACT.md, in one function: `to_frame`.

    columns: a MultiIndex (symbol, field), fields `open, high, low, close, volume` in that order
    index:   a UTC `DatetimeIndex` named `timestamp`, ascending (the bars' open times)
    values:  float64; a symbol without a bar at a timestamp another symbol has gets NaN

Every history DataFrame of the project (the strategy SDK's `history()`, the backtester, the streamer's
Python client) is built here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from papertrade.bars.series import BarSeries
from papertrade.models import Bar

FIELDS = ("open", "high", "low", "close", "volume")


def to_frame(
    data: BarSeries | Iterable[BarSeries] | Mapping[str, BarSeries] | Iterable[Bar],
) -> pd.DataFrame:
    """Bars (one BarSeries, several, a {symbol: BarSeries} mapping, or Bar structs) as the history DataFrame."""
    parts = _as_series(data)
    frames = []
    for s in parts:
        index = pd.DatetimeIndex(s.t.view("datetime64[ns]"), name="timestamp").tz_localize("UTC")
        cols = pd.MultiIndex.from_tuples([(s.symbol, f) for f in FIELDS], names=["symbol", "field"])
        values = np.column_stack([s.o, s.h, s.l, s.c, s.v]) if len(s) else np.zeros((0, 5))
        frames.append(pd.DataFrame(values, index=index, columns=cols, dtype="float64"))
    if not frames:
        return empty_frame()
    out = frames[0] if len(frames) == 1 else pd.concat(frames, axis=1, join="outer", sort=True)
    out = out[~out.index.duplicated(keep="last")].sort_index()
    out.index.name = "timestamp"
    return out


def empty_frame(symbols: Iterable[str] = ()) -> pd.DataFrame:
    """A frame with no rows, following the rule (optionally with these symbols' columns)."""
    cols = pd.MultiIndex.from_tuples([(s, f) for s in symbols for f in FIELDS], names=["symbol", "field"])
    index = pd.DatetimeIndex([], name="timestamp", tz="UTC", dtype="datetime64[ns, UTC]")
    return pd.DataFrame(index=index, columns=cols, dtype="float64")


def _as_series(data: Any) -> list[BarSeries]:
    if isinstance(data, BarSeries):
        return [data]
    if isinstance(data, Mapping):
        return [s.with_symbol(sym) if s.symbol != sym else s for sym, s in data.items()]
    items = list(data)
    if not items:
        return []
    if all(isinstance(x, BarSeries) for x in items):
        return items
    if all(isinstance(x, Bar) for x in items):
        by_symbol: dict[str, list[Bar]] = {}
        for b in items:
            by_symbol.setdefault(b.symbol, []).append(b)
        return [BarSeries.from_bars(bars) for bars in by_symbol.values()]
    raise TypeError("to_frame takes a BarSeries, BarSeries objects, a {symbol: BarSeries} mapping or Bars")
