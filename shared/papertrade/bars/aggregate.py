"""The one aggregation function: bars of a finer interval into 5m / 15m / 30m / 1h / 1d bars.

Intraday bars are stamped with their open time: a bucket is [k * interval, (k + 1) * interval) since
the epoch in UTC (the NYSE opens on the half hour, so 30m buckets start at 09:30 New York and 1h buckets
at 09:00 and hold 09:30..09:59). Daily bars group by the New York date and are stamped with that date's
midnight in New York, written in UTC (Alpaca's convention); in regular hours only the bars inside that
date's NYSE session count (pre/post-market bars are left out of the daily bar), for crypto and 24/7
every bar of the New York day does.

open = first open, high = max high, low = min low, close = last close, volume = sum of volumes.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from papertrade import calendar
from papertrade.bars.series import I64, NS_PER_MIN, NS_PER_S, BarSeries
from papertrade.enums import Interval
from papertrade.errors import ValidationError


def aggregate(series: BarSeries, interval: Interval, *, hours: str = "regular") -> BarSeries:
    """`series` (any interval finer than or equal to `interval`) aggregated into `interval` bars."""
    interval = Interval(interval)
    src = series.interval
    if interval == src:
        return series
    if interval.seconds < src.seconds or interval.seconds % src.seconds:
        raise ValidationError(
            "interval",
            f"cannot aggregate {src.value} bars into {interval.value} bars (it must be a multiple)",
        )
    if len(series) == 0:
        return BarSeries.empty(series.symbol, interval)
    if interval is Interval.D1:
        if not calendar.always_open(series.symbol, hours):
            series = series.take(in_session(series.t))
            if len(series) == 0:
                return BarSeries.empty(series.symbol, interval)
        keys = new_york_midnight(series.t)
    else:
        step = interval.seconds * NS_PER_S
        keys = (series.t // step) * step
    return _reduce(series, keys, interval)


def bucket_start(t_ns: int, interval: Interval) -> int:
    """The open time (ns) of the `interval` bar holding an instant `t_ns`."""
    if interval is Interval.D1:
        return int(new_york_midnight(np.array([t_ns], dtype=np.int64))[0])
    step = interval.seconds * NS_PER_S
    return (t_ns // step) * step


def new_york_midnight(t: I64) -> I64:
    """For each instant, the midnight (in UTC ns) of its New York date (DST-aware)."""
    idx = pd.DatetimeIndex(t.view("datetime64[ns]")).tz_localize("UTC").tz_convert("America/New_York")
    return np.asarray(idx.normalize().tz_convert("UTC").as_unit("ns").asi8, dtype=np.int64)


def in_session(t: I64) -> np.ndarray:
    """Mask of instants inside an NYSE regular session [open, close) (holidays, half days, DST)."""
    from papertrade.bars.synthetic import _session_table

    opens, closes = _session_table()
    m = t // NS_PER_MIN
    i = np.searchsorted(opens, m, side="right") - 1
    ok = i >= 0
    return ok & (m < closes[np.where(ok, i, 0)])


def _reduce(series: BarSeries, keys: I64, interval: Interval) -> BarSeries:
    # series.t is ascending, so buckets are contiguous runs of equal keys
    cut = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [keys.size])) - 1
    return BarSeries(
        series.symbol,
        interval,
        keys[starts],
        series.o[starts],
        np.maximum.reduceat(series.h, starts),
        np.minimum.reduceat(series.l, starts),
        series.c[ends],
        np.round(np.add.reduceat(series.v, starts), 8).astype(np.float64),
    )
