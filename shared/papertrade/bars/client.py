"""History from the streamer's REST API as the DataFrame of CONTRACT.md (an I/O adapter; httpx).

    from papertrade.bars.client import history
    df = history("http://127.0.0.1:8001", ["AAPL", "MSFT"], "5m", start="2024-03-04", limit=500)
    df["AAPL"]["close"]

`history` (sync) and `ahistory` (async) call `GET /v1/bars/{symbol}` once per symbol and join the
answers with `papertrade.bars.frame.to_frame`. Errors from the streamer raise `StreamerError` with its
message (e.g. an unknown interval).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import httpx
import numpy as np
import pandas as pd

from papertrade.bars.frame import empty_frame, to_frame
from papertrade.bars.series import BarSeries
from papertrade.enums import Interval
from papertrade.timeutil import iso, parse_time


class StreamerError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"streamer answered {status}: {message}")
        self.status = status
        self.message = message


def history(
    base_url: str,
    symbols: str | Iterable[str],
    interval: Interval | str = "1m",
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    limit: int | None = None,
    *,
    timeout: float = 30.0,
) -> pd.DataFrame:
    """Bars of `symbols` (start <= t <= end, the first `limit`; without start: the last `limit`)."""
    syms = _symbols(symbols)
    params = _params(interval, start, end, limit)
    with httpx.Client(base_url=base_url, timeout=timeout) as client:
        parts = [
            _series(sym, params["interval"], _check(client.get(_path(sym), params=params))) for sym in syms
        ]
    return to_frame(parts) if parts else empty_frame()


async def ahistory(
    base_url: str,
    symbols: str | Iterable[str],
    interval: Interval | str = "1m",
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    limit: int | None = None,
    *,
    timeout: float = 30.0,
) -> pd.DataFrame:
    """`history`, with httpx.AsyncClient."""
    syms = _symbols(symbols)
    params = _params(interval, start, end, limit)
    parts = []
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:
        for sym in syms:
            resp = await client.get(_path(sym), params=params)
            parts.append(_series(sym, params["interval"], _check(resp)))
    return to_frame(parts) if parts else empty_frame()


def _symbols(symbols: str | Iterable[str]) -> list[str]:
    items = symbols.split(",") if isinstance(symbols, str) else list(symbols)
    return [s.strip().upper() for s in items if s.strip()]


def _params(
    interval: Interval | str, start: datetime | str | None, end: datetime | str | None, limit: int | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"interval": Interval.parse(str(interval)).value}
    if start is not None:
        params["start"] = iso(parse_time(start, "start"))
    if end is not None:
        params["end"] = iso(parse_time(end, "end"))
    if limit is not None:
        params["limit"] = limit
    return params


def _path(symbol: str) -> str:
    return f"/v1/bars/{symbol}"


def _check(resp: httpx.Response) -> list[dict[str, str]]:
    if resp.status_code != 200:
        try:
            message = str(resp.json().get("message", resp.text))
        except ValueError:
            message = resp.text
        raise StreamerError(resp.status_code, message)
    data: list[dict[str, str]] = resp.json()
    return data


def _series(symbol: str, interval: str, rows: list[dict[str, str]]) -> BarSeries:
    if not rows:
        return BarSeries.empty(symbol, Interval(interval))
    t = pd.DatetimeIndex([r["t"] for r in rows]).tz_convert("UTC").as_unit("ns").asi8
    return BarSeries(
        symbol,
        Interval(interval),
        np.asarray(t, dtype=np.int64),
        *(np.array([float(r[k]) for r in rows], dtype=np.float64) for k in ("o", "h", "l", "c", "v")),
    )
