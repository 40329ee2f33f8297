"""`BarSeries`: bars of one symbol and one interval as columns (numpy), the currency of the bars cores.

Times are int64 nanoseconds since the epoch, UTC, ascending, each the bar's open time (daily bars: the
session date's midnight in New York, in UTC). Prices and volumes are float64 holding decimal values
(synthetic prices are rounded to the tick; replayed prices are what the file says): they become exact
`Decimal`s through their shortest repr (`to_decimal_str`), never through binary arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import numpy as np
import numpy.typing as npt

from papertrade.enums import Interval
from papertrade.models import Bar

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

NS_PER_S = 1_000_000_000
NS_PER_MIN = 60 * NS_PER_S


@dataclass(frozen=True, eq=False)
class BarSeries:
    """Columnar bars of one symbol and interval; `t` ascending int64 ns (UTC open times)."""

    symbol: str
    interval: Interval
    t: I64
    o: F64
    h: F64
    l: F64  # noqa: E741 - the wire name
    c: F64
    v: F64

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def __iter__(self) -> Iterator[Bar]:
        return iter(self.to_bars())

    @classmethod
    def empty(cls, symbol: str, interval: Interval) -> BarSeries:
        z = np.zeros(0, dtype=np.float64)
        return cls(symbol, interval, np.zeros(0, dtype=np.int64), z, z, z, z, z)

    @classmethod
    def concat(cls, parts: Iterable[BarSeries], symbol: str, interval: Interval) -> BarSeries:
        items = [p for p in parts if len(p)]
        if not items:
            return cls.empty(symbol, interval)
        if len(items) == 1:
            return items[0]
        return cls(
            symbol,
            interval,
            np.concatenate([p.t for p in items]),
            np.concatenate([p.o for p in items]),
            np.concatenate([p.h for p in items]),
            np.concatenate([p.l for p in items]),
            np.concatenate([p.c for p in items]),
            np.concatenate([p.v for p in items]),
        )

    @classmethod
    def from_bars(
        cls, bars: Iterable[Bar], symbol: str | None = None, interval: Interval | None = None
    ) -> BarSeries:
        """Columns from `Bar` structs (all of one symbol and interval), sorted by time."""
        items = sorted(bars, key=lambda b: b.t)
        if not items:
            if symbol is None or interval is None:
                raise ValueError("from_bars needs symbol and interval for an empty list")
            return cls.empty(symbol, interval)
        sym = symbol or items[0].symbol
        iv = interval or items[0].interval
        return cls(
            sym,
            iv,
            np.array([dt_to_ns(b.t) for b in items], dtype=np.int64),
            np.array([float(b.o) for b in items], dtype=np.float64),
            np.array([float(b.h) for b in items], dtype=np.float64),
            np.array([float(b.l) for b in items], dtype=np.float64),
            np.array([float(b.c) for b in items], dtype=np.float64),
            np.array([float(b.v) for b in items], dtype=np.float64),
        )

    def take(self, index: npt.NDArray[np.bool_] | npt.NDArray[np.intp] | slice) -> BarSeries:
        """A sub-series selected by a mask, index array or slice."""
        return BarSeries(
            self.symbol,
            self.interval,
            self.t[index],
            self.o[index],
            self.h[index],
            self.l[index],
            self.c[index],
            self.v[index],
        )

    def between(self, start_ns: int | None = None, end_ns: int | None = None) -> BarSeries:
        """Bars with start <= t <= end (both inclusive; None means unbounded)."""
        lo = 0 if start_ns is None else int(np.searchsorted(self.t, start_ns, side="left"))
        hi = len(self) if end_ns is None else int(np.searchsorted(self.t, end_ns, side="right"))
        return self.take(slice(lo, hi))

    def with_symbol(self, symbol: str) -> BarSeries:
        return BarSeries(symbol, self.interval, self.t, self.o, self.h, self.l, self.c, self.v)

    def bar(self, i: int) -> Bar:
        return Bar(
            symbol=self.symbol,
            interval=self.interval,
            t=ns_to_dt(int(self.t[i])),
            o=to_decimal_str(float(self.o[i])),
            h=to_decimal_str(float(self.h[i])),
            l=to_decimal_str(float(self.l[i])),
            c=to_decimal_str(float(self.c[i])),
            v=to_decimal_str(float(self.v[i])),
        )

    def to_bars(self) -> list[Bar]:
        return [self.bar(i) for i in range(len(self))]


def to_decimal_str(x: float) -> Decimal:
    """The exact decimal a float stands for (its shortest repr; integral values without `.0`)."""
    return Decimal(num_str(x))


def num_str(x: float) -> str:
    """The shortest decimal text of a float: `187.12`, `5699` (not `5699.0`)."""
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    text = repr(x)
    if "e" in text:  # what Decimal prints: 1e-05 -> 0.00001
        return str(Decimal(text))
    return text


def dt_to_ns(t: datetime) -> int:
    """An aware datetime as int64 epoch nanoseconds (microsecond precision)."""
    if t.tzinfo is None:
        raise ValueError("dt_to_ns needs an aware datetime")
    delta = t.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000


def ns_to_dt(ns: int) -> datetime:
    """Epoch nanoseconds as an aware UTC datetime (microsecond precision)."""
    seconds, rem = divmod(int(ns), NS_PER_S)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=rem // 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
