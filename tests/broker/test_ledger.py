"""The pure ledger: positions, P&L, fees, buying power, and the exact invariant over random fills."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from papertrade.enums import Side
from papertrade.ledger import (
    CommissionModel,
    Ledger,
    PositionState,
    apply_fill,
    buying_power,
    reservation,
)

D = Decimal


def test_long_round_trip_realises_pnl() -> None:
    led = Ledger(cash=D("10000"))
    led.fill("AAPL", Side.BUY, D("10"), D("100"))
    led.fill("AAPL", Side.BUY, D("10"), D("110"))
    assert led.position("AAPL").avg_entry_price == D("105")
    r = led.fill("AAPL", Side.SELL, D("5"), D("120"))
    assert r.realized_pl == D("75")
    r = led.fill("AAPL", Side.SELL, D("15"), D("100"))
    assert r.realized_pl == D("-75")
    assert led.position("AAPL") == PositionState(D("0"), D("0"), D("0"))
    assert led.cash == D("10000")
    led.check_invariant()


def test_short_and_cross_through_zero() -> None:
    pos, realized = apply_fill(PositionState(), Side.SELL, D("10"), D("50"))
    assert pos.qty == D("-10") and pos.cost == D("-500") and pos.avg_entry_price == D("50")
    pos, realized = apply_fill(pos, Side.BUY, D("15"), D("40"))
    assert realized == D("100")  # covered 10 at 40 after selling at 50
    assert pos.qty == D("5") and pos.cost == D("200") and pos.avg_entry_price == D("40")
    assert pos.realized_pl == D("100")


def test_unrealized_and_buying_power() -> None:
    led = Ledger(cash=D("1000"))
    led.fill("X", Side.SELL, D("10"), D("10"))
    assert led.cash == D("1100")
    assert led.unrealized_pl({"X": D("12")}) == D("-20")
    assert led.equity({"X": D("12")}) == D("980")
    assert led.buying_power({"X": D("10")}) == D("900")
    assert buying_power(D("100"), D("0"), D("150")) == D("0")


def test_reservation_covers_and_holds() -> None:
    assert reservation(Side.BUY, D("10"), D("5"), D("0")) == D("50")
    assert reservation(Side.BUY, D("10"), D("5"), D("-4")) == D("30")
    assert reservation(Side.BUY, D("10"), D("5"), D("-4"), D("4")) == D("50")
    assert reservation(Side.SELL, D("10"), D("5"), D("10")) == D("0")
    assert reservation(Side.SELL, D("10"), D("5"), D("10"), D("6")) == D("30")


def test_commission_models() -> None:
    flat = CommissionModel.flat("1.5")
    assert flat.fill_fee(Side.BUY, D("10"), D("100")) == D("1.5")
    assert flat.fill_fee(Side.BUY, D("10"), D("100"), prior_qty=D("10"), prior_fee=D("1.5")) == D("0")
    per = CommissionModel.per_share("0.005", minimum="1")
    assert per.fill_fee(Side.BUY, D("100"), D("10")) == D("1.00")
    assert per.fill_fee(Side.BUY, D("1000"), D("10")) == D("5.00")
    # partial fills pay the same total as one fill of the whole order
    a = per.fill_fee(Side.BUY, D("100"), D("10"))
    b = per.fill_fee(Side.BUY, D("900"), D("10"), prior_qty=D("100"), prior_notional=D("1000"), prior_fee=a)
    assert a + b == D("5.00")
    pct = CommissionModel.percent("0.1", minimum="0", sides="sell")
    assert pct.fill_fee(Side.BUY, D("10"), D("100")) == D("0")
    assert pct.fill_fee(Side.SELL, D("10"), D("100")) == D("1.00")
    capped = CommissionModel.per_share("1", maximum="3")
    assert capped.fill_fee(Side.SELL, D("10"), D("1")) == D("3.00")


_fills = st.lists(
    st.tuples(
        st.sampled_from(["AAPL", "MSFT", "@BTCUSD"]),
        st.sampled_from([Side.BUY, Side.SELL]),
        st.integers(min_value=1, max_value=5000),
        st.integers(min_value=1, max_value=500_000),
        st.integers(min_value=0, max_value=20),
    ),
    min_size=1,
    max_size=400,
)


@settings(max_examples=60, deadline=None)
@given(fills=_fills, kind=st.sampled_from(["none", "flat", "per_share", "percent"]))
def test_invariant_over_random_fills(fills: list[tuple[str, Side, int, int, int]], kind: str) -> None:
    model = CommissionModel.parse({"kind": kind, "amount": "0.013", "minimum": "0.35"})
    led = Ledger(cash=D("1000000"), commission=model)
    qty_by_symbol: dict[str, Decimal] = {}
    for n, (sym, side, qty_units, price_cents, order) in enumerate(fills):
        qty = D(qty_units) / (D("10000") if sym.startswith("@") else 1)
        price = D(price_cents) / 100
        led.fill(sym, side, qty, price, order_id=f"{order}:{side}")
        qty_by_symbol[sym] = qty_by_symbol.get(sym, D(0)) + qty * side.sign
        if n % 50 == 0:
            led.check_invariant()
    led.check_invariant()
    for sym, q in qty_by_symbol.items():
        assert led.position(sym).qty == q
    # closing everything leaves cash = start - fees + realised, and no cost
    for sym, pos in list(led.positions.items()):
        if pos.qty:
            led.fill(sym, pos.side.opposite, abs(pos.qty), D("77.77"), fee=D("0"))
    led.check_invariant()
    assert all(p.cost == 0 for p in led.positions.values())
    assert led.cash == led.starting_cash - led.fees + led.realized_pl


def test_invariant_over_ten_thousand_seeded_fills() -> None:
    import random

    rng = random.Random(7)
    led = Ledger(cash=D("5000000"), commission=CommissionModel.per_share("0.0035", minimum="0.35"))
    expected: dict[str, Decimal] = {}
    for i in range(10_000):
        sym = rng.choice(["A", "B", "C", "D"])
        side = rng.choice([Side.BUY, Side.SELL])
        qty = D(rng.randint(1, 300))
        price = D(rng.randint(100, 100_000)) / 100
        led.fill(sym, side, qty, price, order_id=str(i // 3))
        expected[sym] = expected.get(sym, D(0)) + qty * side.sign
    led.check_invariant()
    assert {s: p.qty for s, p in led.positions.items()} == expected
