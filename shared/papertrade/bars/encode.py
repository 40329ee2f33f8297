"""Fast JSON bodies for `md.bar.<interval>.<symbol>`: byte-for-byte what `papertrade.codec.encode(Bar)` gives.

`payloads(series)` formats a whole BarSeries at once with pyarrow compute kernels (numbers through their
shortest round-trip text, the same text `Decimal(repr(x))` prints), about 5x faster than a Python loop
and 20x faster than building a `Bar` with Decimals per row and encoding it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from papertrade.bars.series import BarSeries, num_str


def payloads(series: BarSeries) -> list[bytes]:
    """The JSON body of every bar of `series`, in order."""
    if len(series) == 0:
        return []
    out: list[bytes] = payload_array(series).cast(pa.binary()).to_pylist()
    return out


def payload_array(series: BarSeries) -> pa.Array:
    """`payloads` as a pyarrow string array (for building NATS frames in bulk without Python objects)."""
    head = f'{{"symbol":"{series.symbol}","interval":"{series.interval.value}","t":"'
    o, h, lo, c, v = (_texts(a) for a in (series.o, series.h, series.l, series.c, series.v))
    parts = [
        head,
        iso_texts(series.t),
        '","o":"',
        o,
        '","h":"',
        h,
        '","l":"',
        lo,
        '","c":"',
        c,
        '","v":"',
        v,
        '"}',
    ]
    return pc.binary_join_element_wise(*parts, "")


def iso_texts(t_ns: np.ndarray) -> pa.Array:
    """`2024-01-02T14:30:00Z` for each epoch-ns instant (whole seconds)."""
    ts = pa.array(t_ns // 1_000_000_000, type=pa.int64()).cast(pa.timestamp("s")).cast(pa.string())
    return pc.binary_join_element_wise(pc.replace_substring(ts, " ", "T"), "Z", "")


def number_texts(values: np.ndarray) -> list[str]:
    """`num_str` of every value (`187.12`, `5699`), as Python strings."""
    out: list[str] = _texts(values).to_pylist()
    return out


def _texts(values: np.ndarray) -> pa.Array:
    arr = pa.array(values, type=pa.float64()).cast(pa.string())
    if pc.any(pc.match_substring(arr, "e")).as_py():  # exponent forms: what Decimal prints instead
        arr = pa.array([num_str(x) for x in values.tolist()], type=pa.string())
    return arr
