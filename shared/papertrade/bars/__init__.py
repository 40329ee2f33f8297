"""The bars core: synthetic market, aggregation, replay loaders, the history DataFrame, Polygon.

Stable API (the strategy SDK and the backtester import these):

    from papertrade.bars import BarSeries, generate, aggregate, to_frame, load_file

- `BarSeries` (`papertrade.bars.series`): bars of one symbol and interval as numpy columns
  `t` (int64 epoch ns, UTC open times, ascending), `o h l c v` (float64 holding decimal values).
  `.between(start_ns, end_ns)` (inclusive), `.take(mask|slice)`, `.to_bars()` -> `papertrade.models.Bar`
  with exact Decimals, `BarSeries.from_bars(bars)`, `len(series)`.
- `generate(symbol, start, end, *, seed=0, hours="regular")` (`papertrade.bars.synthetic`): the seeded
  synthetic 1-minute bars with open time in [start, end]; a pure function of (seed, symbol, hours,
  minute), no history needed, ~1,000,000 bars in well under a second. `hours="24/7"` or a crypto
  `@` symbol trades every minute; `regular` follows NYSE sessions (1990-2035).
- `aggregate(series, interval, *, hours="regular")` (`papertrade.bars.aggregate`): THE aggregation
  into 5m/15m/30m/1h/1d (intraday stamped at open time; daily at the New York date's midnight in UTC,
  session bars only in regular hours).
- `to_frame(data)` (`papertrade.bars.frame`): THE history DataFrame of CONTRACT.md: columns
  MultiIndex (symbol, field) with fields open/high/low/close/volume, UTC DatetimeIndex `timestamp`,
  ascending; takes a BarSeries, several, a {symbol: BarSeries} mapping or `Bar` structs.
  `empty_frame(symbols)` for no data.
- `load_csv(path, symbol=None, *, tz, stamp, interval, on_bad_row, notes)`, `load_parquet(...)`,
  `load_file(...)` (`papertrade.bars.replay`): real bar files; `ReplayFormatError` says what cannot load.
- `payloads(series)` (`papertrade.bars.encode`): the `md.bar.*` JSON bodies, equal to
  `papertrade.codec.encode(bar)` byte for byte.
- Adapters with I/O (not imported here, import the module): `papertrade.bars.polygon.PolygonClient`
  (Polygon REST aggregates) and `papertrade.bars.client.history(...)` (the streamer's REST history as
  the DataFrame).
"""

from papertrade.bars.aggregate import aggregate, bucket_start, new_york_midnight
from papertrade.bars.encode import payloads
from papertrade.bars.frame import FIELDS, empty_frame, to_frame
from papertrade.bars.replay import ReplayFormatError, load_csv, load_file, load_parquet, write_parquet
from papertrade.bars.series import BarSeries, dt_to_ns, ns_to_dt
from papertrade.bars.synthetic import generate, generate_ns, profile

__all__ = [
    "FIELDS",
    "BarSeries",
    "ReplayFormatError",
    "aggregate",
    "bucket_start",
    "dt_to_ns",
    "empty_frame",
    "generate",
    "generate_ns",
    "load_csv",
    "load_file",
    "load_parquet",
    "new_york_midnight",
    "ns_to_dt",
    "payloads",
    "profile",
    "to_frame",
    "write_parquet",
]
