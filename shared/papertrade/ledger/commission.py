"""Commission models (Harvest's paper broker had these): flat, per share, percent of notional."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

import msgspec

from papertrade.enums import Side
from papertrade.errors import ValidationError
from papertrade.money import ZERO, round_cents, to_decimal

CommissionKind = Literal["none", "flat", "per_share", "percent"]
CommissionSides = Literal["both", "buy", "sell"]

_KINDS = ("none", "flat", "per_share", "percent")
_SIDES = ("both", "buy", "sell")


class CommissionModel(msgspec.Struct, frozen=True, kw_only=True):
    """How an account pays for fills.

    - `flat`: `amount` per order (charged on its first fill).
    - `per_share`: `amount` per share (or unit) filled.
    - `percent`: `amount` percent of the filled notional (`0.1` = 0.1 %).
    `minimum` / `maximum` bound the fee of one order; `sides` picks the sides that pay.
    """

    kind: CommissionKind = "none"
    amount: Decimal = ZERO
    minimum: Decimal = ZERO
    maximum: Decimal | None = None
    sides: CommissionSides = "both"

    @classmethod
    def none(cls) -> CommissionModel:
        return cls()

    @classmethod
    def flat(cls, amount: object, *, sides: CommissionSides = "both") -> CommissionModel:
        return cls(
            kind="flat", amount=to_decimal(amount, "commission.amount", non_negative=True), sides=sides
        )

    @classmethod
    def per_share(
        cls, amount: object, *, minimum: object = 0, maximum: object = None, sides: CommissionSides = "both"
    ) -> CommissionModel:
        return cls.parse(
            {"kind": "per_share", "amount": amount, "minimum": minimum, "maximum": maximum, "sides": sides}
        )

    @classmethod
    def percent(
        cls, amount: object, *, minimum: object = 0, maximum: object = None, sides: CommissionSides = "both"
    ) -> CommissionModel:
        return cls.parse(
            {"kind": "percent", "amount": amount, "minimum": minimum, "maximum": maximum, "sides": sides}
        )

    @classmethod
    def parse(cls, value: Any) -> CommissionModel:
        """From a dict such as `{"kind": "per_share", "amount": "0.005", "minimum": "1"}`; None = no fees."""
        if value is None:
            return cls()
        if isinstance(value, CommissionModel):
            return value
        if not isinstance(value, dict):
            raise ValidationError(
                "commission", "must be an object like {'kind': 'per_share', 'amount': '0.005'}"
            )
        unknown = set(value) - {"kind", "amount", "minimum", "maximum", "sides"}
        if unknown:
            raise ValidationError("commission", f"unknown fields {sorted(unknown)}")
        kind = value.get("kind", "none")
        if kind not in _KINDS:
            raise ValidationError("commission.kind", f"must be one of {', '.join(_KINDS)}, got {kind!r}")
        sides = value.get("sides", "both")
        if sides not in _SIDES:
            raise ValidationError("commission.sides", f"must be one of {', '.join(_SIDES)}, got {sides!r}")
        amount = to_decimal(value.get("amount", 0), "commission.amount", non_negative=True)
        minimum = to_decimal(value.get("minimum", 0) or 0, "commission.minimum", non_negative=True)
        raw_max = value.get("maximum")
        maximum = None if raw_max is None else to_decimal(raw_max, "commission.maximum", non_negative=True)
        if maximum is not None and maximum < minimum:
            raise ValidationError("commission.maximum", "must not be below the minimum")
        return cls(kind=kind, amount=amount, minimum=minimum, maximum=maximum, sides=sides)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = msgspec.to_builtins(self)
        return result

    def applies_to(self, side: Side) -> bool:
        return self.kind != "none" and (self.sides == "both" or self.sides == side.value)

    def order_fee(self, side: Side, cum_qty: Decimal, cum_notional: Decimal) -> Decimal:
        """The fee of an order that has filled `cum_qty` for `cum_notional` so far (to the cent)."""
        if not self.applies_to(side) or cum_qty <= 0:
            return ZERO
        if self.kind == "flat":
            raw = self.amount
        elif self.kind == "per_share":
            raw = cum_qty * self.amount
        else:
            raw = cum_notional * self.amount / Decimal(100)
        fee = max(raw, self.minimum)
        if self.maximum is not None:
            fee = min(fee, self.maximum)
        return round_cents(fee)

    def fill_fee(
        self,
        side: Side,
        qty: Decimal,
        price: Decimal,
        *,
        prior_qty: Decimal = ZERO,
        prior_notional: Decimal = ZERO,
        prior_fee: Decimal = ZERO,
    ) -> Decimal:
        """The fee of one fill of `qty` at `price`, given what the same order filled and paid before."""
        target = self.order_fee(side, prior_qty + qty, prior_notional + qty * price)
        return max(target - prior_fee, ZERO)
