"""The streamer's REST API (CONTRACT.md): history, latest bar, clock, watchlist, Alpaca-compatible bars."""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from papertrade import keys
from papertrade.bars.encode import number_texts
from papertrade.bars.polygon import PolygonError
from papertrade.bars.series import NS_PER_S, BarSeries, dt_to_ns
from papertrade.enums import Interval
from papertrade.errors import ValidationError
from papertrade.service import ApiError, ServiceContext
from papertrade.service.app import AdminDep
from papertrade.symbols import normalize_symbol
from papertrade.timeutil import parse_time
from papertrade_streamer.engine import Engine, RunSpec
from papertrade_streamer.feeds import UnknownSymbol, collect

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000

router = APIRouter()


class WatchlistBody(BaseModel):
    symbols: list[str] = Field(..., description="symbols to publish (upper case; crypto with a leading @)")
    intervals: list[str] | None = Field(None, description="intervals to publish; unchanged when omitted")


class RunBody(BaseModel):
    mode: Literal["realtime", "accelerated", "replay"] = "replay"
    start: str | None = Field(None, description="ISO 8601; default: the feed's first bar, or now")
    end: str | None = Field(None, description="ISO 8601; required for replay unless the feed ends")
    speed: float = Field(1.0, gt=0, description="accelerated: simulation seconds per wall second")


@router.get("/v1/bars/{symbol}", summary="Historical bars, ascending, start <= t <= end, the first `limit`")
async def get_bars(
    request: Request,
    symbol: str,
    interval: str = "1m",
    start: str | None = None,
    end: str | None = None,
    limit: int | None = None,
) -> Response:
    engine = _engine(request)
    sym = normalize_symbol(symbol)
    iv = Interval.parse(interval)
    n = _limit(limit)
    now = engine.now_ns()
    start_ns, end_ns = _range(start, end, now)
    series = await _collect(engine, sym, iv, start_ns, end_ns, n, now)
    return Response(orjson.dumps(_rows(series)), media_type="application/json")


@router.get("/v1/latest/{symbol}", summary="The latest bar of a symbol (default interval 1m)")
async def get_latest(request: Request, symbol: str, interval: str = "1m") -> Response:
    engine = _engine(request)
    sym = normalize_symbol(symbol)
    iv = Interval.parse(interval)
    body = engine.latest.get(keys.latest_bar(iv, sym))
    if body is None:
        now = engine.now_ns()
        series = await _collect(engine, sym, iv, None, now, 1, now)
        if len(series) == 0:
            raise ApiError.not_found(f"no {iv.value} bar of {sym} before {_iso(now)}")
        from papertrade.bars.encode import payloads

        body = payloads(series)[-1]
    return Response(body, media_type="application/json")


@router.get("/v1/clock", summary="Simulation time and the market's state")
async def get_clock(request: Request) -> dict[str, Any]:
    engine = _engine(request)
    return engine.clock_state()


@router.get("/v1/watchlist", summary="The symbols and intervals being published")
async def get_watchlist(request: Request) -> dict[str, Any]:
    return _engine(request).watch.to_json()


@router.put("/v1/watchlist", summary="Replace the watchlist (admin)", dependencies=[AdminDep])
async def put_watchlist(request: Request, body: WatchlistBody) -> dict[str, Any]:
    engine = _engine(request)
    symbols: list[str] = []
    for i, s in enumerate(body.symbols):
        sym = normalize_symbol(s, f"symbols[{i}]")
        if not engine.feed.has(sym):
            raise ValidationError(f"symbols[{i}]", f"the {engine.feed.name} feed has no data for {sym}")
        if sym not in symbols:
            symbols.append(sym)
    if body.intervals is not None:
        ivs = sorted({Interval.parse(x, "intervals") for x in body.intervals}, key=lambda i: i.seconds)
        if not ivs:
            raise ValidationError("intervals", "must name at least one interval")
        engine.watch.intervals = ivs
    engine.watch.symbols = symbols
    engine.watchlist_changed()
    await _ctx(request).links.redis.set(keys.WATCHLIST, orjson.dumps(engine.watch.to_json()))
    return engine.watch.to_json()


@router.get("/v1/status", summary="The feed, the current run and how many bars it published")
async def get_status(request: Request) -> dict[str, Any]:
    return _engine(request).status_json()


@router.post(
    "/admin/run",
    summary="(Re)start a run: replay between two dates, or a clocked run",
    dependencies=[AdminDep],
)
async def post_run(request: Request, body: RunBody) -> Response:
    engine = _engine(request)
    start_ns = dt_to_ns(parse_time(body.start, "start")) if body.start else None
    end_ns = dt_to_ns(parse_time(body.end, "end")) if body.end else None
    spec = default_run(engine, body.mode, start_ns, end_ns, body.speed)
    engine.start_run(spec)
    return Response(orjson.dumps(engine.status_json()), status_code=202, media_type="application/json")


@router.post("/admin/stop", summary="Stop the current run (the clock stops)", dependencies=[AdminDep])
async def post_stop(request: Request) -> dict[str, Any]:
    engine = _engine(request)
    engine.stop_run()
    return engine.status_json()


@router.get(
    "/v2/stocks/bars", summary="Alpaca-compatible historical bars (alpaca-py StockHistoricalDataClient)"
)
async def alpaca_bars(
    request: Request,
    symbols: str = Query(..., description="comma-separated symbols"),
    timeframe: str = Query("1Day"),
    start: str | None = None,
    end: str | None = None,
    limit: int | None = None,
    page_token: str | None = None,
    sort: str = "asc",
    feed: str | None = None,
    adjustment: str | None = None,
    asof: str | None = None,
    currency: str | None = None,
) -> Response:
    engine = _engine(request)
    syms = sorted({normalize_symbol(s, "symbols") for s in symbols.split(",") if s.strip()})
    if not syms:
        raise ValidationError("symbols", "name at least one symbol")
    iv = Interval.parse(timeframe, "timeframe")
    n = _limit(limit)
    if sort not in ("asc", "desc"):
        raise ValidationError("sort", "must be asc or desc")
    now = engine.now_ns()
    start_ns, end_ns = _range(start, end, now, default_start_days=1)
    first_sym, after_ns = 0, start_ns
    if page_token:
        first_sym, after_ns = _decode_token(page_token, len(syms))
    out: dict[str, list[dict[str, Any]]] = {}
    remaining = n
    token: str | None = None
    for si in range(first_sym, len(syms)):
        sym = syms[si]
        lo = after_ns if si == first_sym else start_ns
        try:
            series = await _collect(engine, sym, iv, lo, end_ns, remaining + 1, now)
        except ApiError as exc:
            if exc.status == 404:
                continue
            raise
        if len(series) > remaining:
            token = _encode_token(si, int(series.t[remaining]))
            series = series.take(slice(0, remaining))
        if len(series):
            out[sym] = _alpaca_rows(series)
            remaining -= len(series)
        if token is not None:
            break
        if remaining <= 0:
            if si + 1 < len(syms) and start_ns is not None:
                token = _encode_token(si + 1, start_ns)
            break
    if sort == "desc":
        for rows in out.values():
            rows.reverse()
    return Response(orjson.dumps({"bars": out, "next_page_token": token}), media_type="application/json")


def default_run(engine: Engine, mode: str, start_ns: int | None, end_ns: int | None, speed: float) -> RunSpec:
    """A run with the gaps filled: start at the feed's first bar or now; a replay ends at the feed's end."""
    cover = engine.feed.coverage()
    now = engine.now_ns() if engine.run_spec is not None else _wall_ns()
    if start_ns is None:
        if cover is not None:
            start_ns = cover[0]
        elif mode == "replay":
            start_ns = (end_ns or now) - 5 * 86_400 * NS_PER_S
        else:
            start_ns = now
    if mode == "replay" and end_ns is None:
        if cover is not None:
            end_ns = cover[1] + 86_400 * NS_PER_S
        else:
            end_ns = now if start_ns < now else start_ns + 86_400 * NS_PER_S
    if end_ns is not None and end_ns <= start_ns:
        raise ValidationError("end", "must be after start")
    return RunSpec(mode, start_ns, end_ns, speed if mode == "accelerated" else 1.0)


# ----------------------------------------------------------------------------------------------------


def _wall_ns() -> int:
    from papertrade.timeutil import utcnow

    return dt_to_ns(utcnow())


def _ctx(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


def _engine(request: Request) -> Engine:
    engine: Engine = _ctx(request).state["engine"]
    return engine


def _limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    if limit < 1 or limit > MAX_LIMIT:
        raise ValidationError("limit", f"must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def _range(
    start: str | None, end: str | None, now: int, default_start_days: int | None = None
) -> tuple[int | None, int]:
    start_ns = dt_to_ns(parse_time(start, "start")) if start else None
    end_ns = dt_to_ns(parse_time(end, "end")) if end else now
    if start_ns is not None and end_ns < start_ns:
        raise ValidationError("end", f"{end} is before start {start}")
    if start_ns is None and default_start_days is not None:
        start_ns = end_ns - default_start_days * 86_400 * NS_PER_S
    return start_ns, end_ns


async def _collect(
    engine: Engine, symbol: str, interval: Interval, start_ns: int | None, end_ns: int, limit: int, now: int
) -> BarSeries:
    try:
        return await asyncio.to_thread(collect, engine.feed, symbol, interval, start_ns, end_ns, limit, now)
    except UnknownSymbol as exc:
        raise ApiError.not_found(str(exc)) from None
    except PolygonError as exc:
        raise ApiError(502, f"polygon: {exc}") from None


def _rows(series: BarSeries) -> list[dict[str, str]]:
    if len(series) == 0:
        return []
    ts = _iso_list(series.t)
    o, h, lo, c, v = (number_texts(a) for a in (series.o, series.h, series.l, series.c, series.v))
    return [
        {"t": a, "o": b, "h": d, "l": e, "c": f, "v": g}
        for a, b, d, e, f, g in zip(ts, o, h, lo, c, v, strict=True)
    ]


def _alpaca_rows(series: BarSeries) -> list[dict[str, Any]]:
    ts = _iso_list(series.t)
    vw = np.round((series.h + series.l + series.c) / 3.0, 4).tolist()
    n = np.maximum(1, np.rint(series.v / 100.0)).astype(np.int64).tolist()
    vol = [int(x) if float(x).is_integer() else x for x in series.v.tolist()]
    return [
        {"t": t, "o": o, "h": h, "l": lo, "c": c, "v": v, "n": k, "vw": w}
        for t, o, h, lo, c, v, k, w in zip(
            ts,
            series.o.tolist(),
            series.h.tolist(),
            series.l.tolist(),
            series.c.tolist(),
            vol,
            n,
            vw,
            strict=True,
        )
    ]


def _iso_list(t: np.ndarray) -> list[str]:
    return [s + "Z" for s in np.datetime_as_string(t.view("datetime64[ns]"), unit="s").tolist()]


def _iso(ns: int) -> str:
    return _iso_list(np.array([ns], dtype=np.int64))[0]


def _encode_token(sym_index: int, t_ns: int) -> str:
    return base64.urlsafe_b64encode(f"{sym_index}:{t_ns}".encode()).decode().rstrip("=")


def _decode_token(token: str, n_syms: int) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        a, _, b = raw.partition(":")
        si, t = int(a), int(b)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("page_token", "is not a token this server gave out") from None
    if not 0 <= si < n_syms:
        raise ValidationError("page_token", "does not match these symbols")
    return si, t
