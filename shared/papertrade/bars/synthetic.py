"""The seeded synthetic market: 1-minute bars that are a pure function of (seed, symbol, hours, minute).

No wall clock, no state, no history: any range (30 years back or tomorrow) is generated on demand,
vectorised with numpy, and the bar of a given minute is the same whatever range it was asked in and in
whatever process. How (all random numbers come from a counter-based hash of (seed, symbol, stream,
index), so any of them can be drawn without drawing the others):

- **Level**: a Brownian path over day indices, built by Lévy's midpoint construction (dyadic refinement
  from anchors 2^16 days apart), so the level of any day costs O(log) draws and no earlier history.
  Pinned to the symbol's reference price on 2020-01-01, with a small drift; linear within a day.
- **Intraday**: in each block (an NYSE session in regular hours; a UTC day when 24/7) a Brownian bridge
  from 0 to 0 driven by per-minute shocks with stochastic volatility, so blocks join smoothly (at a block
  edge only the level counts) and a regular-hours session opens with a realistic overnight gap.
- **Stochastic volatility**: smooth value noise over ~16 days and ~3 days (volatility clustering),
  over hours, and an intraday U-shape (busier open and close); volume follows the same U-shape, the
  minute's move and lognormal noise.
- **OHLC**: open and close are the path at the minute's edges (open = previous minute's close inside a
  block), high/low extend beyond them by a random fraction of the minute's volatility; all prices are
  rounded to the $0.01 tick, so low <= min(open, close) <= max(open, close) <= high always holds, and
  volume >= 1 (crypto: >= 0.0001).

Regular hours follow the NYSE calendar (`papertrade.calendar`: holidays, half days, DST); crypto
(`@` symbols) and `hours="24/7"` trade every minute.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt
import pandas as pd

from papertrade import calendar
from papertrade.bars.series import NS_PER_MIN, BarSeries, dt_to_ns
from papertrade.enums import Interval
from papertrade.symbols import is_crypto

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

MIN_PER_DAY = 1440
_GROUP_MINUTES = 1 << 16
#: Day index (since 1970-01-01) of 2020-01-01: the level is pinned there to the reference price.
REFERENCE_DAY = 18262
HOURS = ("regular", "24/7")


@dataclass(frozen=True)
class Profile:
    """How one symbol's synthetic market looks: price on 2020-01-01, daily volatility, volume per minute."""

    price: float
    daily_vol: float
    volume: float
    drift_per_year: float = 0.06


#: A few familiar symbols start near familiar prices; any other symbol gets a seeded profile.
KNOWN_PROFILES: dict[str, Profile] = {
    "AAPL": Profile(75.0, 0.018, 25_000),
    "MSFT": Profile(160.0, 0.016, 18_000),
    "SPY": Profile(325.0, 0.010, 60_000),
    "QQQ": Profile(210.0, 0.013, 40_000),
    "TSLA": Profile(28.0, 0.035, 30_000),
    "NVDA": Profile(6.0, 0.028, 45_000),
    "AMZN": Profile(93.0, 0.019, 20_000),
    "@BTCUSD": Profile(7200.0, 0.035, 4.0, 0.3),
    "@ETHUSD": Profile(130.0, 0.045, 40.0, 0.3),
}


def profile(symbol: str, seed: int = 0) -> Profile:
    """The symbol's profile: a known one, else drawn from a hash of (seed, symbol)."""
    known = KNOWN_PROFILES.get(symbol)
    if known is not None:
        return known
    h = _symbol_key(seed, symbol, "profile")
    u1 = ((h >> 11) & 0xFFFFF) / float(1 << 20)
    u2 = ((h >> 31) & 0xFFFFF) / float(1 << 20)
    u3 = ((h >> 51) & 0xFFF) / float(1 << 12)
    if is_crypto(symbol):
        return Profile(round(math.exp(math.log(0.5) + u1 * math.log(20000)), 2), 0.03 + 0.03 * u2, 50.0, 0.2)
    price = round(math.exp(math.log(10.0) + u1 * math.log(50.0)), 2)  # $10 .. $500
    return Profile(price, 0.012 + 0.02 * u2, float(int(2_000 + 30_000 * u3)))


def generate(
    symbol: str,
    start: datetime,
    end: datetime,
    *,
    seed: int = 0,
    hours: str = "regular",
) -> BarSeries:
    """The 1-minute bars of `symbol` with open time in [start, end] (both inclusive), ascending."""
    return generate_ns(symbol, dt_to_ns(start), dt_to_ns(end), seed=seed, hours=hours)


def generate_ns(
    symbol: str, start_ns: int, end_ns: int, *, seed: int = 0, hours: str = "regular"
) -> BarSeries:
    """`generate` with epoch-nanosecond bounds."""
    if hours not in HOURS:
        raise ValueError(f"hours must be one of {HOURS}, got {hours!r}")
    if end_ns < start_ns:
        return BarSeries.empty(symbol, Interval.M1)
    m0 = -(-start_ns // NS_PER_MIN)  # first whole minute >= start
    m1 = end_ns // NS_PER_MIN
    if m1 < m0:
        return BarSeries.empty(symbol, Interval.M1)
    always = calendar.always_open(symbol, hours)
    starts, lengths = _day_blocks(m0, m1) if always else _session_blocks(m0, m1)
    if starts.size == 0:
        return BarSeries.empty(symbol, Interval.M1)
    # ~64k minutes at a time: the temporaries stay small and reused (cache, no fresh page faults);
    # every value depends on its minute only, so the pieces are the same as one big call
    group = max(1, _GROUP_MINUTES // int(lengths.max()))
    parts = [
        _build(symbol, seed, always, starts[i : i + group], lengths[i : i + group], m0, m1)
        for i in range(0, starts.size, group)
    ]
    return BarSeries.concat(parts, symbol, Interval.M1)


def minutes_open(symbol: str, start: datetime, end: datetime, *, hours: str = "regular") -> int:
    """How many 1-minute bars [start, end] holds for this symbol (without generating them)."""
    m0 = -(-dt_to_ns(start) // NS_PER_MIN)
    m1 = dt_to_ns(end) // NS_PER_MIN
    if m1 < m0:
        return 0
    starts, lengths = _day_blocks(m0, m1) if calendar.always_open(symbol, hours) else _session_blocks(m0, m1)
    ends = starts + lengths
    lo = np.maximum(starts, m0)
    hi = np.minimum(ends, m1 + 1)
    return int(np.clip(hi - lo, 0, None).sum())


# ----------------------------------------------------------------------------------------------------


def _build(symbol: str, seed: int, always: bool, starts: I64, lengths: I64, m0: int, m1: int) -> BarSeries:
    prof = profile(symbol, seed)
    key = _symbol_key(seed, symbol, "bars")
    total = int(lengths.sum())
    offsets = np.zeros(starts.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    block_of = np.repeat(np.arange(starts.size), lengths)
    k = np.arange(total, dtype=np.int64) - offsets[block_of]  # minute index inside its block
    n = lengths[block_of]
    m = starts[block_of] + k  # epoch minute of each bar

    # --- volatility: clustering over days, hours, and the intraday shape ---------------------------
    day_f = m.astype(np.float64) / MIN_PER_DAY
    vol_days = np.exp(
        0.35 * _value_noise(key ^ 0x11, m, 16 * MIN_PER_DAY)
        + 0.15 * _value_noise(key ^ 0x12, m, 3 * MIN_PER_DAY)
    )
    vol_hours = np.exp(0.20 * _value_noise(key ^ 0x13, m, 60))
    shape = _intraday_shape(k, n, m, always)
    per_min = 0.6 * prof.daily_vol / math.sqrt(MIN_PER_DAY if always else 390.0)
    sigma = per_min * vol_days * vol_hours * shape

    # --- the intraday bridge, per block ------------------------------------------------------------
    eps = _normal(_hash(key ^ 0x21, m))
    inc = sigma * eps
    csum = np.cumsum(inc)
    block_base = np.zeros(starts.size, dtype=np.float64)
    block_base[1:] = csum[offsets[1:] - 1]
    s_end = csum - block_base[block_of]  # S after each minute
    block_total = s_end[offsets + lengths - 1]
    y_end = s_end - ((k + 1) / n) * block_total[block_of]
    y_start = np.empty_like(y_end)
    y_start[1:] = y_end[:-1]
    y_start[offsets] = 0.0

    # --- the level: a Lévy-constructed Brownian path over days, pinned at the reference day -----------
    d_lo = int(np.floor(day_f[0])) - 1
    d_hi = int(np.floor((m[-1] + 1) / MIN_PER_DAY)) + 1
    level_days, level_vals = _levy(key ^ 0x31, d_lo, d_hi)
    _, ref_vals = _levy(key ^ 0x31, REFERENCE_DAY, REFERENCE_DAY)
    sigma_level = 0.8 * prof.daily_vol
    level_vals = sigma_level * (level_vals - ref_vals[0])
    drift = prof.drift_per_year / 365.25

    def log_price(minute: F64) -> F64:
        x = minute / MIN_PER_DAY
        i = np.floor(x).astype(np.int64) - level_days[0]
        frac = x - np.floor(x)
        lvl = level_vals[i] * (1.0 - frac) + level_vals[i + 1] * frac
        return math.log(prof.price) + lvl + drift * (x - REFERENCE_DAY)

    mf = m.astype(np.float64)
    p_open = np.exp(log_price(mf) + y_start)
    p_close = np.exp(log_price(mf + 1.0) + y_end)

    # --- high / low / volume ------------------------------------------------------------------------
    h2 = _hash(key ^ 0x41, m)
    e_hi = -np.log(_u32(h2 >> np.uint64(32)))
    e_lo = -np.log(_u32(h2 & np.uint64(0xFFFFFFFF)))
    o_t = np.rint(p_open * 100.0)
    c_t = np.rint(p_close * 100.0)
    o_t = np.maximum(o_t, 1.0)
    c_t = np.maximum(c_t, 1.0)
    top = np.maximum(o_t, c_t)
    bottom = np.minimum(o_t, c_t)
    h_t = np.maximum(np.rint(top * np.exp(0.5 * sigma * e_hi)), top)
    l_t = np.maximum(np.minimum(np.rint(bottom * np.exp(-0.5 * sigma * e_lo)), bottom), 1.0)

    vnoise = _normal(_hash(key ^ 0x51, m))
    move = np.abs(eps)
    vol = prof.volume * _volume_shape(k, n, m, always) * np.exp(0.35 * vnoise) * (0.6 + 0.4 * move)
    vol *= vol_days
    volume = np.maximum(np.round(vol, 4), 0.0001) if is_crypto(symbol) else np.maximum(np.rint(vol), 1.0)

    sel = (m >= m0) & (m <= m1)
    return BarSeries(
        symbol,
        Interval.M1,
        m[sel] * NS_PER_MIN,
        o_t[sel] / 100.0,
        h_t[sel] / 100.0,
        l_t[sel] / 100.0,
        c_t[sel] / 100.0,
        volume[sel],
    )


def _day_blocks(m0: int, m1: int) -> tuple[I64, I64]:
    d0, d1 = m0 // MIN_PER_DAY, m1 // MIN_PER_DAY
    starts = np.arange(d0, d1 + 1, dtype=np.int64) * MIN_PER_DAY
    return starts, np.full(starts.size, MIN_PER_DAY, dtype=np.int64)


def _session_blocks(m0: int, m1: int) -> tuple[I64, I64]:
    """NYSE sessions overlapping minutes [m0, m1] as (open minute, length in minutes)."""
    opens, closes = _session_table()
    # sessions whose [open, close) overlaps [m0, m1]
    lo = int(np.searchsorted(closes, m0, side="right"))
    hi = int(np.searchsorted(opens, m1, side="right"))
    if hi <= lo:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return opens[lo:hi], closes[lo:hi] - opens[lo:hi]


_SESSIONS: tuple[I64, I64] | None = None


def _session_table() -> tuple[I64, I64]:
    """Every NYSE session the calendar knows, as epoch minutes (open, close), ascending (built once)."""
    global _SESSIONS
    if _SESSIONS is None:
        cal = calendar.nyse()
        opens = np.asarray(pd.DatetimeIndex(cal.opens).as_unit("ns").asi8, dtype=np.int64) // NS_PER_MIN
        closes = np.asarray(pd.DatetimeIndex(cal.closes).as_unit("ns").asi8, dtype=np.int64) // NS_PER_MIN
        _SESSIONS = (opens, closes)
    return _SESSIONS


def _intraday_shape(k: I64, n: I64, m: I64, always: bool) -> F64:
    if always:
        hour = (m % MIN_PER_DAY).astype(np.float64) / 60.0
        return 1.0 + 0.25 * np.cos(2 * np.pi * (hour - 15.0) / 24.0)
    kf = k.astype(np.float64)
    left = (n - k - 1).astype(np.float64)
    return 0.8 + 0.9 * np.exp(-kf / 25.0) + 0.4 * np.exp(-left / 25.0)


def _volume_shape(k: I64, n: I64, m: I64, always: bool) -> F64:
    if always:
        hour = (m % MIN_PER_DAY).astype(np.float64) / 60.0
        return 1.0 + 0.4 * np.cos(2 * np.pi * (hour - 15.0) / 24.0)
    kf = k.astype(np.float64)
    left = (n - k - 1).astype(np.float64)
    return 0.6 + 2.5 * np.exp(-kf / 20.0) + 2.0 * np.exp(-left / 15.0)


def _levy(key: int, lo: int, hi: int, top_log2: int = 16) -> tuple[I64, F64]:
    """A standard Brownian path W (W(0) = 0, unit variance per step) at every integer in [lo, hi].

    Lévy's construction: W at multiples of 2^top_log2 is a random walk of few steps; each halving
    places midpoints at (left + right)/2 + sqrt(s)/2 * N(hash(midpoint)); only the intervals that cover
    [lo, hi] are refined, so the cost is O(hi - lo + top_log2), whatever lo is.
    """
    span = 1 << top_log2
    k0 = lo // span
    k1 = -(-hi // span)
    if k1 == k0:
        k1 = k0 + 1
    ks = np.arange(min(k0, 0), max(k1, 0) + 1, dtype=np.int64)
    z = _normal(_hash(key ^ 0x7F, ks)) * math.sqrt(span)
    walk = np.zeros(ks.size, dtype=np.float64)
    zero = int(np.searchsorted(ks, 0))
    # W(j*span) - W((j-1)*span) = z[j]; W(0) = 0
    if zero + 1 < ks.size:
        walk[zero + 1 :] = np.cumsum(z[zero + 1 :])
    if zero > 0:
        walk[:zero] = -np.cumsum(z[1 : zero + 1][::-1])[::-1]
    sel = (ks >= k0) & (ks <= k1)
    pos = ks[sel] * span
    vals = walk[sel]
    s = span
    while s > 1:
        half = s // 2
        mids = pos[:-1] + half
        mvals = 0.5 * (vals[:-1] + vals[1:]) + (math.sqrt(s) / 2.0) * _normal(_hash(key, mids))
        npos = np.empty(pos.size * 2 - 1, dtype=np.int64)
        nvals = np.empty(npos.size, dtype=np.float64)
        npos[0::2], npos[1::2] = pos, mids
        nvals[0::2], nvals[1::2] = vals, mvals
        a = (lo // half) * half
        b = -(-hi // half) * half
        keep = (npos >= a) & (npos <= b)
        pos, vals = npos[keep], nvals[keep]
        s = half
    return pos, vals


def _value_noise(key: int, m: I64, scale: int) -> F64:
    """Smooth noise in [-~2, ~2]: normals at multiples of `scale` minutes, smoothstep-interpolated."""
    node = m // scale
    first = int(node[0])
    nodes = np.arange(first, int(node[-1]) + 2, dtype=np.int64)
    vals = _normal(_hash(key, nodes))
    i = node - first
    f = (m - node * scale).astype(np.float64) / scale
    f = f * f * (3.0 - 2.0 * f)
    return vals[i] * (1.0 - f) + vals[i + 1] * f


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


def _hash(key: int, counter: I64) -> U64:
    """splitmix64 of (key, counter): a counter-based generator (random access by index)."""
    x = counter.astype(np.uint64) * _GOLDEN + np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    x = x ^ (x >> _S30)
    x = x * _M1
    x = x ^ (x >> _S27)
    x = x * _M2
    return x ^ (x >> _S31)


def _u32(x: U64) -> F64:
    """Uniform in (0, 1) from 32 random bits."""
    return (x.astype(np.float64) + 0.5) * (1.0 / 4294967296.0)


def _normal(h: U64) -> F64:
    """Standard normals by Box-Muller from the two 32-bit halves of each hash."""
    u1 = _u32(h >> np.uint64(32))
    u2 = _u32(h & np.uint64(0xFFFFFFFF))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _symbol_key(seed: int, symbol: str, stream: str) -> int:
    digest = hashlib.blake2b(f"{seed}|{symbol}|{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


__all__ = ["HOURS", "KNOWN_PROFILES", "Profile", "generate", "generate_ns", "minutes_open", "profile"]
