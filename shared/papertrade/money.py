"""Exact decimals for money and quantities.

Cash, prices and quantities are `decimal.Decimal` everywhere outside the book; on the wire they are
strings. Binary floats are accepted only at the edge (a JSON number), converted through their shortest
repr so that `100.1` means exactly `Decimal("100.1")`, and never used for arithmetic.
"""

from __future__ import annotations

import decimal
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal

from papertrade.errors import ValidationError

ZERO = Decimal(0)
CENT = Decimal("0.01")
#: The default price grid of a US equity above $1.
DEFAULT_TICK = Decimal("0.01")
#: The largest quantity or price the stack accepts: beyond it an input is a typo or an attack.
MAX_MAGNITUDE = Decimal("1e12")

# 28 significant digits are not enough for cash at 1e12 with 9 decimals of quantity.
decimal.getcontext().prec = 38


def to_decimal(
    value: object,
    field: str,
    *,
    positive: bool = False,
    non_negative: bool = False,
    allow_none: bool = False,
) -> Decimal:
    """Parse `value` (str, int, Decimal or float) into a finite Decimal or raise ValidationError naming `field`."""
    if value is None:
        if allow_none:
            return None  # type: ignore[return-value]
        raise ValidationError(field, "is required")
    if isinstance(value, bool):
        raise ValidationError(field, f"must be a decimal number, got {value!r}")
    try:
        if isinstance(value, Decimal):
            d = value
        elif isinstance(value, int):
            d = Decimal(value)
        elif isinstance(value, float):
            d = Decimal(repr(value))
        elif isinstance(value, str):
            d = Decimal(value.strip())
        else:
            raise ValidationError(field, f"must be a decimal number, got {type(value).__name__}")
    except decimal.InvalidOperation:
        raise ValidationError(field, f"must be a decimal number, got {value!r}") from None
    if not d.is_finite():
        raise ValidationError(field, f"must be finite, got {value!r}")
    if abs(d) > MAX_MAGNITUDE:
        raise ValidationError(field, f"is too large: {value!r} (limit {MAX_MAGNITUDE:,f})")
    if positive and d <= 0:
        raise ValidationError(field, f"must be greater than 0, got {fmt(d)}")
    if non_negative and d < 0:
        raise ValidationError(field, f"must not be negative, got {fmt(d)}")
    return d


def fmt(value: Decimal | int | None) -> str | None:
    """The canonical wire string of a decimal: no exponent, no trailing zeros (`"10"`, `"101.5"`)."""
    if value is None:
        return None
    d = Decimal(value)
    if d == 0:
        return "0"
    text = format(d.normalize(), "f")
    return text


def round_cents(value: Decimal) -> Decimal:
    """Round to the cent, half to even (banker's rounding, what a ledger uses)."""
    return value.quantize(CENT, rounding=ROUND_HALF_EVEN)


def on_tick(price: Decimal, tick: Decimal) -> bool:
    """Whether `price` lies on the grid of `tick`."""
    return (price % tick) == 0


def check_tick(price: Decimal, tick: Decimal, field: str) -> Decimal:
    """Return `price` if it is on the `tick` grid, else raise ValidationError naming `field`."""
    if not on_tick(price, tick):
        raise ValidationError(field, f"{fmt(price)} is not a multiple of the tick size {fmt(tick)}")
    return price


def to_ticks(price: Decimal, tick: Decimal) -> int:
    """The integer number of ticks in an on-grid price."""
    n = price / tick
    if n != n.to_integral_value():
        raise ValidationError("price", f"{fmt(price)} is not a multiple of the tick size {fmt(tick)}")
    return int(n)


def from_ticks(ticks: int, tick: Decimal) -> Decimal:
    return Decimal(ticks) * tick


def floor_to(value: Decimal, step: Decimal) -> Decimal:
    """Round `value` down to a multiple of `step` (e.g. a notional order's whole shares)."""
    return (value / step).to_integral_value(rounding=ROUND_DOWN) * step
