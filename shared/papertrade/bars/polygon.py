"""Polygon.io REST aggregates client (an I/O adapter of the bars core; httpx, synchronous).

    client = PolygonClient.from_env()                      # POLYGON_API_KEY or POLYGON_SECRET_FILE
    series = client.bars("AAPL", Interval.M1, start, end)  # -> BarSeries, all pages

`GET /v2/aggs/ticker/{T}/range/{mult}/{timespan}/{from}/{to}?adjusted=true&sort=asc&limit=50000`, then
every `next_url` page. Crypto symbols (`@BTCUSD`) are asked as `X:BTCUSD`. The basic plan allows 5
requests a minute: a sliding-window limiter spaces requests (`requests_per_minute`); a 429 waits
(`Retry-After` if given, else exponential backoff) and retries, as do 5xx answers and network errors,
up to `max_retries`; 401/403 fail at once with `PolygonAuthError` (bad or missing key / plan without
access). `clock` and `sleep` are injectable so tests need not wait.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from papertrade.bars.series import BarSeries, dt_to_ns
from papertrade.enums import Interval
from papertrade.symbols import is_crypto

DEFAULT_BASE_URL = "https://api.polygon.io"

_TIMESPANS = {
    Interval.M1: (1, "minute"),
    Interval.M5: (5, "minute"),
    Interval.M15: (15, "minute"),
    Interval.M30: (30, "minute"),
    Interval.H1: (1, "hour"),
    Interval.D1: (1, "day"),
}


class PolygonError(RuntimeError):
    """Polygon refused or failed a request; the message says what to do."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PolygonAuthError(PolygonError):
    """401/403: the key is missing, wrong, or its plan does not cover the request."""


class PolygonRateLimited(PolygonError):
    """429 answered more times than the retries allow."""


def load_api_key(env: dict[str, str] | None = None, secret_file: str | Path | None = None) -> str:
    """The key: `POLYGON_API_KEY`, else `polygon_api_key` in the YAML secret file (`POLYGON_SECRET_FILE`)."""
    environ = os.environ if env is None else env
    key = environ.get("POLYGON_API_KEY", "").strip()
    if key:
        return key
    path = secret_file or environ.get("POLYGON_SECRET_FILE")
    if not path:
        raise PolygonAuthError(
            "no Polygon key: set POLYGON_API_KEY or POLYGON_SECRET_FILE (YAML with polygon_api_key)"
        )
    p = Path(path)
    if not p.is_file():
        raise PolygonAuthError(f"Polygon secret file {p} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    key = str(data.get("polygon_api_key", "")).strip() if isinstance(data, dict) else ""
    if not key:
        raise PolygonAuthError(f"Polygon secret file {p} has no polygon_api_key")
    return key


def polygon_ticker(symbol: str) -> str:
    """`@BTCUSD` -> `X:BTCUSD`, `@BTC` -> `X:BTCUSD`; equities unchanged."""
    if is_crypto(symbol):
        base = symbol[1:]
        return f"X:{base}" if base.endswith("USD") else f"X:{base}USD"
    return symbol


class PolygonClient:
    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        requests_per_minute: int = 5,
        max_retries: int = 5,
        max_pages: int = 10_000,
        backoff: float = 1.0,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise PolygonAuthError("empty Polygon API key")
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.requests_per_minute = requests_per_minute
        self.max_retries = max_retries
        self.max_pages = max_pages
        self.backoff = backoff
        self._clock = clock
        self._sleep = sleep
        self._sent: deque[float] = deque()
        self._http = httpx.Client(timeout=timeout, transport=transport)
        self.requests = 0

    @classmethod
    def from_env(cls, **kwargs: Any) -> PolygonClient:
        base = os.environ.get("POLYGON_BASE_URL", DEFAULT_BASE_URL)
        kwargs.setdefault("base_url", base)
        return cls(load_api_key(), **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PolygonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def bars(self, symbol: str, interval: Interval, start: datetime, end: datetime) -> BarSeries:
        """Every aggregate of `symbol` with open time in [start, end], following `next_url` pages."""
        mult, span = _TIMESPANS[Interval(interval)]
        ticker = polygon_ticker(symbol)
        frm = dt_to_ns(start) // 1_000_000
        to = dt_to_ns(end) // 1_000_000
        pages = 0
        url: str | None = f"{self.base_url}/v2/aggs/ticker/{ticker}/range/{mult}/{span}/{frm}/{to}"
        params: dict[str, Any] | None = {"adjusted": "true", "sort": "asc", "limit": 50000}
        rows: list[dict[str, Any]] = []
        while url:
            body = self._get(url, params)
            rows.extend(body.get("results") or [])
            url = body.get("next_url")
            pages += 1
            if pages > self.max_pages:
                raise PolygonError(
                    f"Polygon kept paging past {self.max_pages} pages for {ticker}; narrow the range"
                )
            params = None  # next_url carries the query (cursor) already; the key is added in _get
        return _to_series(symbol, Interval(interval), rows, dt_to_ns(start), dt_to_ns(end))

    def _get(self, url: str, params: dict[str, Any] | None) -> dict[str, Any]:
        query = dict(params or {})
        query["apiKey"] = self.api_key
        attempt = 0
        while True:
            self._throttle()
            try:
                # next_url carries its own query (the cursor): merge, never replace it
                resp = self._http.get(httpx.URL(url).copy_merge_params(query))
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise PolygonError(f"Polygon unreachable after {attempt + 1} tries: {exc}") from None
                self._sleep(self.backoff * 2**attempt)
                attempt += 1
                continue
            self.requests += 1
            if resp.status_code == 200:
                data = resp.json()
                if not isinstance(data, dict):
                    raise PolygonError("Polygon answered with something that is not a JSON object")
                return data
            message = _error_text(resp)
            if resp.status_code in (401, 403):
                raise PolygonAuthError(
                    f"Polygon refused the key ({resp.status_code}): {message}. Check POLYGON_API_KEY / "
                    "POLYGON_SECRET_FILE and that your plan covers this data",
                    resp.status_code,
                )
            if resp.status_code == 429 or resp.status_code >= 500:
                if attempt >= self.max_retries:
                    cls = PolygonRateLimited if resp.status_code == 429 else PolygonError
                    raise cls(
                        f"Polygon answered {resp.status_code} {attempt + 1} times: {message}",
                        resp.status_code,
                    )
                wait = _retry_after(resp)
                self._sleep(wait if wait is not None else self.backoff * 2**attempt)
                attempt += 1
                continue
            raise PolygonError(f"Polygon answered {resp.status_code}: {message}", resp.status_code)

    def _throttle(self) -> None:
        if self.requests_per_minute <= 0:
            return
        now = self._clock()
        while self._sent and now - self._sent[0] >= 60.0:
            self._sent.popleft()
        if len(self._sent) >= self.requests_per_minute:
            wait = 60.0 - (now - self._sent[0])
            if wait > 0:
                self._sleep(wait)
            now = self._clock()
            self._sent.popleft()
        self._sent.append(now)


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200] or resp.reason_phrase
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body.get("status") or body)
    return str(body)[:200]


def _to_series(symbol: str, interval: Interval, rows: list[dict[str, Any]], lo: int, hi: int) -> BarSeries:
    if not rows:
        return BarSeries.empty(symbol, interval)
    t = np.array([int(r["t"]) for r in rows], dtype=np.int64) * 1_000_000
    s = BarSeries(
        symbol,
        interval,
        t,
        np.array([float(r["o"]) for r in rows]),
        np.array([float(r["h"]) for r in rows]),
        np.array([float(r["l"]) for r in rows]),
        np.array([float(r["c"]) for r in rows]),
        np.array([float(r.get("v", 0)) for r in rows]),
    )
    order = np.argsort(s.t, kind="stable")
    s = s.take(order)
    keep = np.concatenate(([True], s.t[1:] != s.t[:-1]))
    return s.take(keep).between(lo, hi)
