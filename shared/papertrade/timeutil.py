"""Time helpers: UTC inside and on the wire, ISO 8601 in, naive means the user's local zone.

Nothing here reads the wall clock except `utcnow()`, which only the service shells call; pure cores
take time as an argument.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from papertrade.errors import ValidationError

NEW_YORK = ZoneInfo("America/New_York")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def local_zone() -> tzinfo:
    """The user's zone: `PAPERTRADE_TZ` or `TZ` if set to an IANA name, else the system's local zone."""
    for var in ("PAPERTRADE_TZ", "TZ"):
        name = os.environ.get(var)
        if name:
            try:
                return ZoneInfo(name.lstrip(":"))
            except (ZoneInfoNotFoundError, ValueError):
                continue
    local = datetime.now().astimezone().tzinfo
    return local if local is not None else UTC


def parse_time(value: object, field: str = "timestamp", *, tz: tzinfo | None = None) -> datetime:
    """Parse an ISO 8601 string, a date, a datetime or epoch seconds into an aware UTC datetime.

    A naive value is in the user's local zone (`tz`, default `local_zone()`); a bare date is that
    day's midnight in that zone. A trailing `Z` is accepted.
    """
    zone = tz if tz is not None else None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime.combine(value, time())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return EPOCH + timedelta(seconds=float(value))
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValidationError(field, "is empty; expected an ISO 8601 date or time")
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValidationError(
                field, f"cannot parse {value!r} as ISO 8601 (e.g. 2024-01-02T14:30:00Z or 2024-01-02)"
            ) from None
    else:
        raise ValidationError(field, f"expected an ISO 8601 string or a datetime, got {type(value).__name__}")
    if dt.tzinfo is None or dt.tzinfo.utcoffset(dt) is None:
        dt = dt.replace(tzinfo=zone or local_zone())
    return dt.astimezone(UTC)


def iso(dt: datetime) -> str:
    """The wire form of a time: UTC, ISO 8601, `Z` suffix, microseconds only when present."""
    if dt.tzinfo is None:
        raise ValueError("iso() needs an aware datetime; parse naive input with parse_time() first")
    dt = dt.astimezone(UTC)
    text = dt.isoformat(timespec="microseconds" if dt.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def to_local(dt: datetime, tz: tzinfo | None = None) -> datetime:
    """The same instant in the user's zone, for display."""
    return dt.astimezone(tz or local_zone())


def utcnow() -> datetime:
    """The wall clock in UTC. Only service shells call this; cores take time as an argument."""
    return datetime.now(UTC)


def floor_time(dt: datetime, seconds: int) -> datetime:
    """Floor an aware datetime to a multiple of `seconds` since the epoch (UTC)."""
    ts = int((dt - EPOCH).total_seconds() // seconds) * seconds
    return EPOCH + timedelta(seconds=ts)
