from decimal import Decimal

import pytest

from papertrade.errors import ValidationError
from papertrade.money import check_tick, floor_to, fmt, from_ticks, round_cents, to_decimal, to_ticks


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10", Decimal("10")),
        (10, Decimal(10)),
        (100.1, Decimal("100.1")),
        (" 1.50 ", Decimal("1.50")),
        (Decimal("0.0001"), Decimal("0.0001")),
    ],
)
def test_to_decimal_accepts_strings_ints_floats_exactly(value: object, expected: Decimal) -> None:
    assert to_decimal(value, "qty") == expected


def test_float_goes_through_its_shortest_repr_not_its_binary_value() -> None:
    assert to_decimal(0.1, "price") == Decimal("0.1")
    assert to_decimal(0.1, "price") != Decimal(0.1)  # noqa: RUF032 - the binary value, on purpose


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("abc", "must be a decimal number"),
        ("NaN", "must be finite"),
        ("inf", "must be finite"),
        (True, "must be a decimal number"),
        ([1], "must be a decimal number"),
        ("1e13", "too large"),
        (None, "is required"),
    ],
)
def test_to_decimal_rejects_bad_input_naming_the_field(value: object, fragment: str) -> None:
    with pytest.raises(ValidationError) as err:
        to_decimal(value, "limit_price")
    assert err.value.field == "limit_price"
    assert str(err.value).startswith("limit_price: ")
    assert fragment in str(err.value)


def test_sign_constraints() -> None:
    with pytest.raises(ValidationError, match="qty: must be greater than 0, got 0"):
        to_decimal("0", "qty", positive=True)
    with pytest.raises(ValidationError, match="must not be negative"):
        to_decimal("-1", "cash", non_negative=True)
    assert to_decimal("0", "cash", non_negative=True) == 0


def test_fmt_is_canonical() -> None:
    assert fmt(Decimal("10.000")) == "10"
    assert fmt(Decimal("101.50")) == "101.5"
    assert fmt(Decimal("1E+3")) == "1000"
    assert fmt(Decimal("-0.00")) == "0"
    assert fmt(Decimal("0.000001")) == "0.000001"
    assert fmt(None) is None


def test_ticks_round_trip_and_grid_check() -> None:
    tick = Decimal("0.01")
    assert to_ticks(Decimal("101.25"), tick) == 10125
    assert from_ticks(10125, tick) == Decimal("101.25")
    assert check_tick(Decimal("1.50"), tick, "limit_price") == Decimal("1.50")
    with pytest.raises(ValidationError, match=r"limit_price: 1.005 is not a multiple of the tick size 0.01"):
        check_tick(Decimal("1.005"), tick, "limit_price")
    with pytest.raises(ValidationError):
        to_ticks(Decimal("1.005"), tick)


def test_rounding_helpers() -> None:
    assert round_cents(Decimal("1.005")) == Decimal("1.00")  # half to even
    assert round_cents(Decimal("1.015")) == Decimal("1.02")
    assert floor_to(Decimal("12.9"), Decimal("1")) == Decimal("12")
    assert floor_to(Decimal("0.00019"), Decimal("0.0001")) == Decimal("0.0001")
