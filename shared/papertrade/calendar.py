"""The market calendar: NYSE sessions (holidays, half days, DST) via exchange_calendars, or 24/7.

Pure: every function takes the instant it is asked about. Crypto (`@` symbols) is always open.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

import pandas as pd

from papertrade.symbols import is_crypto
from papertrade.timeutil import NEW_YORK

_FIRST = "1990-01-02"
_LAST = "2035-12-31"


@cache
def nyse() -> Any:
    """The XNYS calendar (loaded once; covers 1990 to 2035)."""
    import exchange_calendars as xcals

    return xcals.get_calendar("XNYS", start=_FIRST, end=_LAST)


def always_open(symbol: str | None, hours: str = "regular") -> bool:
    """True when the symbol trades 24/7: crypto, or any symbol when `hours` is `24/7`."""
    return hours == "24/7" or (symbol is not None and is_crypto(symbol))


def is_open(t: datetime, symbol: str | None = None, hours: str = "regular") -> bool:
    """Whether the market of `symbol` is open at instant `t` (aware)."""
    if always_open(symbol, hours):
        return True
    cal = nyse()
    minute = pd.Timestamp(t).tz_convert(UTC).floor("min")
    return bool(cal.is_open_on_minute(minute, ignore_breaks=True))


def session_bounds(day: date) -> tuple[datetime, datetime] | None:
    """(open, close) in UTC of the NYSE session on `day`, or None if it is not a session."""
    cal = nyse()
    label = pd.Timestamp(day)
    if not cal.is_session(label):
        return None
    return (
        cal.session_open(label).to_pydatetime().astimezone(UTC),
        cal.session_close(label).to_pydatetime().astimezone(UTC),
    )


def session_of(t: datetime) -> date | None:
    """The NYSE session date whose open <= t < close, or None outside regular hours."""
    day = t.astimezone(NEW_YORK).date()
    bounds = session_bounds(day)
    if bounds is not None and bounds[0] <= t < bounds[1]:
        return day
    return None


def next_open(t: datetime, symbol: str | None = None, hours: str = "regular") -> datetime:
    """The first open strictly after `t` (for 24/7 markets: `t` itself)."""
    if always_open(symbol, hours):
        return t
    cal = nyse()
    return cal.next_open(pd.Timestamp(t).tz_convert(UTC)).to_pydatetime().astimezone(UTC)


def next_close(t: datetime, symbol: str | None = None, hours: str = "regular") -> datetime:
    """The first close strictly after `t` (for 24/7 markets: the next UTC midnight)."""
    if always_open(symbol, hours):
        return (t.astimezone(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    cal = nyse()
    return cal.next_close(pd.Timestamp(t).tz_convert(UTC)).to_pydatetime().astimezone(UTC)


def sessions(start: date, end: date) -> list[tuple[date, datetime, datetime]]:
    """Every NYSE session in [start, end] as (date, open UTC, close UTC), ascending."""
    cal = nyse()
    out: list[tuple[date, datetime, datetime]] = []
    labels = cal.sessions_in_range(pd.Timestamp(start), pd.Timestamp(end))
    opens = cal.opens.loc[labels]
    closes = cal.closes.loc[labels]
    for label, o, c in zip(labels, opens, closes, strict=True):
        out.append((label.date(), o.to_pydatetime().astimezone(UTC), c.to_pydatetime().astimezone(UTC)))
    return out
