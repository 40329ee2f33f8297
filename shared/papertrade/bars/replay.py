"""Replay loaders: CSV and Parquet files of real bars into `BarSeries`.

CSV: a header row naming the columns (any case; `Date`, optional `Time`, `Open`, `High`, `Low`,
`Close`, optional `Adj Close`, `Volume`, `OpenInterest`; or one `Datetime`/`Timestamp` column).
A file whose header is one column short while every row carries `Date,Time,...` (as in
`2006-01-02-volume-min-001.txt`) is repaired (a `Time` column is inserted after `Date`) and the repair
is reported in `notes`; a file whose columns cannot be identified, or a row that cannot be parsed, is
refused with a `ReplayFormatError` naming the file, the line and what is wrong (`on_bad_row="skip"`
loads the good rows instead and reports the skipped ones).

Times without a zone are in `tz` (default America/New_York). Files holding only dates are daily
bars, stamped with that date's midnight in New York (in UTC). Intraday rows stamped with the bar's
close time (backtrader's minute files are) need `stamp="close"`; the interval is inferred from the
most common spacing unless given.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from papertrade.bars.series import NS_PER_S, BarSeries
from papertrade.enums import Interval
from papertrade.errors import ValidationError
from papertrade.symbols import normalize_symbol

Stamp = Literal["open", "close"]
BadRow = Literal["raise", "skip"]

_ALIASES = {
    "date": "date",
    "day": "date",
    "time": "time",
    "datetime": "datetime",
    "timestamp": "datetime",
    "t": "datetime",
    "open": "open",
    "o": "open",
    "high": "high",
    "h": "high",
    "low": "low",
    "l": "low",
    "close": "close",
    "c": "close",
    "adjclose": "adj_close",
    "volume": "volume",
    "vol": "volume",
    "v": "volume",
    "openinterest": "open_interest",
    "oi": "open_interest",
    "symbol": "symbol",
}
_TIME_RE = re.compile(r"^\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?$")
_REQUIRED = ("open", "high", "low", "close")


class ReplayFormatError(ValidationError):
    """A replay file (or part of it) cannot be loaded; the message says which file, where and why."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__("replay", f"{path}: {message}")
        self.path = str(path)


def load_file(path: str | Path, symbol: str | None = None, **options: Any) -> BarSeries:
    """Load a `.parquet` / `.pq` file with `load_parquet`, anything else with `load_csv`."""
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        return load_parquet(p, symbol, **options)
    return load_csv(p, symbol, **options)


def load_csv(
    path: str | Path,
    symbol: str | None = None,
    *,
    tz: str = "America/New_York",
    stamp: Stamp = "open",
    interval: Interval | str | None = None,
    on_bad_row: BadRow = "raise",
    notes: list[str] | None = None,
) -> BarSeries:
    """The bars of a CSV file (see the module doc for the accepted shapes)."""
    p = Path(path)
    sym = normalize_symbol(symbol) if symbol else symbol_from_path(p)
    if not p.is_file():
        raise ReplayFormatError(p, "no such file")
    names = _columns(p, notes)
    try:
        raw = pd.read_csv(
            p,
            header=None,
            skiprows=1,
            names=names,
            dtype=str,
            on_bad_lines="skip" if on_bad_row == "skip" else "error",
            skip_blank_lines=True,
            engine="c",
        )
    except pd.errors.ParserError as exc:
        raise ReplayFormatError(p, f"a row does not have {len(names)} fields ({exc})") from None
    return _finish(
        p, sym, raw, tz=tz, stamp=stamp, interval=interval, on_bad_row=on_bad_row, notes=notes, line_offset=2
    )


def load_parquet(
    path: str | Path,
    symbol: str | None = None,
    *,
    tz: str = "America/New_York",
    stamp: Stamp = "open",
    interval: Interval | str | None = None,
    on_bad_row: BadRow = "raise",
    notes: list[str] | None = None,
) -> BarSeries:
    """The bars of a Parquet file: a time column (or a DatetimeIndex) and open/high/low/close[/volume]."""
    p = Path(path)
    if not p.is_file():
        raise ReplayFormatError(p, "no such file")
    try:
        df = pd.read_parquet(p)
    except Exception as exc:
        raise ReplayFormatError(p, f"not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    if isinstance(df.index, pd.DatetimeIndex):
        df = df.reset_index(names="datetime")
    df = df.rename(columns={c: _ALIASES.get(_norm(str(c)), _norm(str(c))) for c in df.columns})
    if symbol is None and "symbol" in df.columns and df["symbol"].nunique() == 1:
        symbol = str(df["symbol"].iloc[0])
    sym = normalize_symbol(symbol) if symbol else symbol_from_path(p)
    if "symbol" in df.columns:
        df = df[df["symbol"].astype(str).str.upper() == sym]
    return _finish(
        p, sym, df, tz=tz, stamp=stamp, interval=interval, on_bad_row=on_bad_row, notes=notes, line_offset=0
    )


def write_parquet(series: BarSeries, path: str | Path) -> None:
    """Write bars as Parquet (columns timestamp UTC, open, high, low, close, volume, symbol)."""
    df = pd.DataFrame(
        {
            "timestamp": pd.DatetimeIndex(series.t.view("datetime64[ns]")).tz_localize("UTC"),
            "open": series.o,
            "high": series.h,
            "low": series.l,
            "close": series.c,
            "volume": series.v,
            "symbol": series.symbol,
        }
    )
    df.to_parquet(Path(path), index=False)


def symbol_from_path(path: Path) -> str:
    """`orcl-1995-2014.txt` -> `ORCL`: the first part of the file name that contains a letter."""
    for part in re.split(r"[-_ .]", path.stem):
        if re.search(r"[A-Za-z]", part):
            try:
                return normalize_symbol(part)
            except ValidationError:
                break
    raise ReplayFormatError(path, "cannot tell the symbol from the file name; give it (SYMBOL=path)")


# ----------------------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.strip().lower())


def _columns(p: Path, notes: list[str] | None) -> list[str]:
    """The column names of the file's rows, repairing a header one column short (Date,Time rows)."""
    with p.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        sample = [row for _, row in zip(range(20), reader, strict=False) if row]
    if not header:
        raise ReplayFormatError(p, "the file is empty (no header row)")
    raw_names = [_norm(h) for h in header]
    names = [_ALIASES.get(n, n or f"col{i}") for i, n in enumerate(raw_names)]
    if not sample:
        raise ReplayFormatError(p, "the file has a header but no rows")
    widths = {len(r) for r in sample}
    if len(widths) != 1:
        raise ReplayFormatError(p, f"the first rows have different numbers of fields: {sorted(widths)}")
    width = widths.pop()
    if width == len(names) + 1 and "date" in names and "time" not in names and "datetime" not in names:
        di = names.index("date")
        if all(_TIME_RE.match(r[di + 1].strip()) for r in sample):
            names.insert(di + 1, "time")
            if notes is not None:
                notes.append(
                    f"{p.name}: the header names {len(header)} columns but rows have {width}; "
                    "the field after Date is a time, so a Time column was inserted"
                )
    if width != len(names):
        raise ReplayFormatError(
            p,
            f"the header names {len(names)} columns ({', '.join(header)}) but rows have {width} fields, "
            "and the extra or missing column cannot be identified",
        )
    missing = [c for c in _REQUIRED if c not in names]
    if "date" not in names and "datetime" not in names:
        missing.insert(0, "date")
    if missing:
        raise ReplayFormatError(p, f"missing column(s) {', '.join(missing)} in header {','.join(header)}")
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            names[i] = f"{n}_{i}"
        seen.add(n)
    return names


def _finish(
    p: Path,
    sym: str,
    df: pd.DataFrame,
    *,
    tz: str,
    stamp: Stamp,
    interval: Interval | str | None,
    on_bad_row: BadRow,
    notes: list[str] | None,
    line_offset: int,
) -> BarSeries:
    missing = [c for c in _REQUIRED if c not in df.columns]
    if "datetime" not in df.columns and "date" not in df.columns:
        missing.insert(0, "date or timestamp")
    if missing:
        raise ReplayFormatError(
            p, f"missing column(s) {', '.join(missing)}; has {', '.join(map(str, df.columns))}"
        )
    df = df.reset_index(drop=True)
    nums = {c: pd.to_numeric(df[c], errors="coerce") for c in (*_REQUIRED, "volume") if c in df.columns}
    if "volume" not in nums:
        nums["volume"] = pd.Series(np.zeros(len(df)), index=df.index)
    daily = False
    if "datetime" in df.columns:
        col = df["datetime"]
        if pd.api.types.is_datetime64_any_dtype(col):
            ts = pd.DatetimeIndex(col)
        else:
            ts = pd.DatetimeIndex(
                pd.to_datetime(col.astype(str), errors="coerce", format="ISO8601", utc=False)
            )
    else:
        dates = df["date"].astype(str).str.strip()
        if "time" in df.columns:
            text = dates + " " + df["time"].astype(str).str.strip()
            ts = pd.DatetimeIndex(pd.to_datetime(text, errors="coerce", format="mixed"))
        else:
            ts = pd.DatetimeIndex(pd.to_datetime(dates, errors="coerce", format="mixed"))
            daily = True
    bad = np.asarray(ts.isna())
    for s in nums.values():
        bad |= np.asarray(s.isna())
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        where = f"line {first + line_offset}" if line_offset else f"row {first}"
        if on_bad_row == "raise":
            raise ReplayFormatError(
                p, f"{where}: cannot parse {df.iloc[first].to_dict()} ({int(bad.sum())} bad row(s) in all)"
            )
        if notes is not None:
            notes.append(
                f"{p.name}: skipped {int(bad.sum())} row(s) that cannot be parsed (first at {where})"
            )
    keep = ~bad
    ts = ts[keep]
    if len(ts) == 0:
        raise ReplayFormatError(p, "no loadable rows")
    if ts.tz is None:
        zone = "America/New_York" if daily else tz
        ts = ts.tz_localize(zone, ambiguous=False, nonexistent="shift_forward")
    if daily:
        ts = ts.tz_convert("America/New_York").normalize()
    t = np.asarray(ts.tz_convert("UTC").as_unit("ns").asi8, dtype=np.int64)
    iv = Interval.parse(str(interval)) if interval is not None else (Interval.D1 if daily else _infer(p, t))
    if stamp == "close" and iv is not Interval.D1:
        t = t - iv.seconds * NS_PER_S
    cols = {k: np.asarray(v[keep], dtype=np.float64) for k, v in nums.items()}
    order = np.argsort(t, kind="stable")
    t = t[order]
    dup = np.concatenate((t[1:] == t[:-1], [False]))
    if dup.any() and notes is not None:
        notes.append(f"{p.name}: {int(dup.sum())} duplicate timestamp(s); the last row of each was kept")
    sel = order[~dup]
    return BarSeries(
        sym,
        iv,
        t[~dup],
        cols["open"][sel],
        cols["high"][sel],
        cols["low"][sel],
        cols["close"][sel],
        cols["volume"][sel],
    )


def _infer(p: Path, t: np.ndarray) -> Interval:
    if t.size < 2:
        raise ReplayFormatError(p, "one intraday row: give the interval explicitly")
    diffs = np.diff(np.sort(t))
    diffs = diffs[diffs > 0]
    values, counts = np.unique(diffs, return_counts=True)
    step = int(values[np.argmax(counts)]) // NS_PER_S
    for iv in Interval:
        if iv.seconds == step:
            return iv
    raise ReplayFormatError(
        p, f"rows are {step}s apart, which is not an interval we serve; give it explicitly"
    )
