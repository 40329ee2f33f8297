"""Per-account risk limits: one validated object, every limit optional (None = unlimited)."""

from __future__ import annotations

from decimal import Decimal
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from papertrade.errors import ValidationError
from papertrade.money import to_decimal
from papertrade.symbols import normalize_symbol

#: The numeric limits, in the order the rules report them.
NUMERIC_LIMITS = (
    "max_order_qty",
    "max_order_notional",
    "max_position_qty",
    "max_gross_exposure",
    "max_daily_loss",
    "max_orders_per_second",
    "price_collar_pct",
)


class Limits(BaseModel):
    """The limits of one account (CONTRACT.md `/v1/limits`). Unset (None) means unlimited.

    - `max_order_qty`: shares (units) in one order.
    - `max_order_notional`: qty x price of one order (limit price, else stop price, else the mark).
    - `max_position_qty`: |position| per symbol after this order, counting the account's open orders
      on the same side (worst case: every open order fills).
    - `max_gross_exposure`: sum over symbols of the worst-case |position| x mark, after this order.
    - `max_daily_loss`: once the day's loss (realised + unrealised) reaches it, only orders that reduce
      a position are accepted.
    - `max_orders_per_second`: token bucket (burst = max(rate, 1), refilled at `rate` per second).
    - `price_collar_pct`: a limit price more than this percentage away from the reference price (last
      trade, else the latest bar close) is refused.
    - `allowed_symbols` (None = all) / `blocked_symbols`.
    - `trading_hours`: `any` (default) or `regular` (NYSE session only; crypto always open).
    - `clip_to_limits`: reduce an order that breaks a quantity limit to fit, instead of refusing it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_order_qty: Decimal | None = None
    max_order_notional: Decimal | None = None
    max_position_qty: Decimal | None = None
    max_gross_exposure: Decimal | None = None
    max_daily_loss: Decimal | None = None
    max_orders_per_second: Decimal | None = None
    price_collar_pct: Decimal | None = None
    allowed_symbols: list[str] | None = None
    blocked_symbols: list[str] | None = None
    trading_hours: Literal["any", "regular"] = "any"
    clip_to_limits: bool = False

    @field_validator(
        "max_order_qty",
        "max_order_notional",
        "max_position_qty",
        "max_gross_exposure",
        "max_orders_per_second",
        "price_collar_pct",
        mode="before",
    )
    @classmethod
    def _positive(cls, value: Any, info: Any) -> Decimal | None:
        return _decimal(value, info.field_name, positive=True)

    @field_validator("max_daily_loss", mode="before")
    @classmethod
    def _non_negative(cls, value: Any, info: Any) -> Decimal | None:
        return _decimal(value, info.field_name, positive=False)

    @field_validator("allowed_symbols", "blocked_symbols", mode="before")
    @classmethod
    def _symbols(cls, value: Any, info: Any) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ValueError(f"must be a list of symbols, got {type(value).__name__}")
        out: list[str] = []
        for i, item in enumerate(value):
            try:
                sym = normalize_symbol(item, f"{info.field_name}[{i}]")
            except ValidationError as exc:
                raise ValueError(exc.message) from None
            if sym not in out:
                out.append(sym)
        return out

    @cached_property
    def unlimited(self) -> bool:
        """True when no limit is set (every order passes but the kill switch)."""
        return self == _UNLIMITED

    @cached_property
    def _symbol_sets(self) -> tuple[frozenset[str] | None, frozenset[str]]:
        allowed = frozenset(self.allowed_symbols) if self.allowed_symbols is not None else None
        return allowed, frozenset(self.blocked_symbols or ())

    def symbol_sets(self) -> tuple[frozenset[str] | None, frozenset[str]]:
        """(allowed or None for all, blocked) as sets."""
        return self._symbol_sets


_UNLIMITED = Limits()


def _decimal(value: Any, field: str, *, positive: bool) -> Decimal | None:
    if value is None:
        return None
    try:
        return to_decimal(value, field, positive=positive, non_negative=not positive)
    except ValidationError as exc:
        raise ValueError(exc.message) from None
