"""The pure risk rules: each limit at, just under and just over; clipping; state bookkeeping."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from pydantic import ValidationError

from papertrade.enums import ExecType, OrderType, Side, TimeInForce
from papertrade.messages import ExecReport, RiskCheckRequest
from papertrade.risk import AccountRiskState, Limits, RiskEngine, check, reserve_for, take
from papertrade.risk.state import PositionState, can_change

D = Decimal
ACCOUNT = uuid.uuid4()
# Wednesday 2026-11-18 15:00 UTC = 10:00 New York: the NYSE is open
OPEN_T = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)
# Saturday
CLOSED_T = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)


def order(
    qty: str | None = "100",
    side: Side = Side.BUY,
    symbol: str = "AAPL",
    limit: str | None = None,
    notional: str | None = None,
    t: datetime = OPEN_T,
    replaces: uuid.UUID | None = None,
    stop: str | None = None,
) -> RiskCheckRequest:
    kind = OrderType.LIMIT if limit is not None else (OrderType.STOP if stop else OrderType.MARKET)
    return RiskCheckRequest(
        order_id=uuid.uuid4(),
        account_id=ACCOUNT,
        symbol=symbol,
        side=side,
        type=kind,
        time_in_force=TimeInForce.DAY,
        t=t,
        qty=None if qty is None else D(qty),
        notional=None if notional is None else D(notional),
        limit_price=None if limit is None else D(limit),
        stop_price=None if stop is None else D(stop),
        replaces=replaces,
    )


MARKS = {"AAPL": D("100"), "MSFT": D("200")}


def decide(o: RiskCheckRequest, state: AccountRiskState | None = None, **limits: Any) -> Any:
    return check(o, Limits(**limits), state or AccountRiskState(), MARKS)


def fill(
    symbol: str, side: Side, qty: str, price: str, t: datetime = OPEN_T, oid: uuid.UUID | None = None
) -> ExecReport:
    return ExecReport(
        exec=ExecType.FILL,
        seq=1,
        order_id=oid or uuid.uuid4(),
        account_id=ACCOUNT,
        symbol=symbol,
        side=side,
        t=t,
        exec_id=uuid.uuid4().hex,
        price=D(price),
        qty=D(qty),
    )


# --- each limit at / under / over --------------------------------------------------------------------


@pytest.mark.parametrize(("qty", "ok"), [("499", True), ("500", True), ("501", False)])
def test_max_order_qty(qty: str, ok: bool) -> None:
    d = decide(order(qty), max_order_qty=500)
    assert (d.decision == "approve") is ok
    if not ok:
        assert d.rule == "max_order_qty"
        assert d.reason == "max_order_qty 500 exceeded: order qty 501"


@pytest.mark.parametrize(("qty", "ok"), [("99", True), ("100", True), ("101", False)])
def test_max_order_notional_limit_price(qty: str, ok: bool) -> None:
    d = decide(order(qty, limit="100"), max_order_notional=10_000)
    assert (d.decision == "approve") is ok
    if not ok:
        assert d.reason == "max_order_notional 10000 exceeded: order notional 10100"


def test_max_order_notional_market_uses_mark_and_notional_orders() -> None:
    assert decide(order("100"), max_order_notional=10_000).decision == "approve"
    assert decide(order("101"), max_order_notional=10_000).decision == "reject"
    assert decide(order(None, notional="10000"), max_order_notional=10_000).decision == "approve"
    d = decide(order(None, notional="10000.01"), max_order_notional=10_000)
    assert d.decision == "reject" and d.rule == "max_order_notional"
    nomark = check(order("1", symbol="ZZZ"), Limits(max_order_notional=10), AccountRiskState(), {})
    assert nomark.decision == "reject" and "no reference price for ZZZ" in (nomark.reason or "")


def _state_with(
    pos: str = "0", open_buy: str | None = None, open_sell: str | None = None
) -> AccountRiskState:
    s = AccountRiskState()
    if D(pos) != 0:
        s.positions["AAPL"] = PositionState(D(pos), D("100"))
    if open_buy:
        s.reserve("b1", "AAPL", Side.BUY, D(open_buy), D("100"), None)
    if open_sell:
        s.reserve("s1", "AAPL", Side.SELL, D(open_sell), D("100"), None)
    return s


@pytest.mark.parametrize(("qty", "ok"), [("119", True), ("120", True), ("121", False)])
def test_max_position_qty_counts_position_and_open_orders(qty: str, ok: bool) -> None:
    state = _state_with(pos="300", open_buy="80")
    d = decide(order(qty), state, max_position_qty=500)
    assert (d.decision == "approve") is ok
    if not ok:
        assert d.reason == f"max_position_qty 500 exceeded: would be {300 + 80 + int(qty)}"


def test_max_position_qty_example_message_and_short_side() -> None:
    d = decide(order("320"), _state_with(pos="300"), max_position_qty=500)
    assert d.reason == "max_position_qty 500 exceeded: would be 620"
    # selling from a 300 long with 100 already offered: worst short = 300 - 100 - qty
    state = _state_with(pos="300", open_sell="100")
    assert decide(order("700", Side.SELL), state, max_position_qty=500).decision == "approve"
    d = decide(order("701", Side.SELL), state, max_position_qty=500)
    assert d.decision == "reject" and d.reason == "max_position_qty 500 exceeded: would be -501"
    # a sell that reduces a position above the limit is fine
    assert decide(order("100", Side.SELL), _state_with(pos="900"), max_position_qty=500).decision == "approve"


@pytest.mark.parametrize(("qty", "ok"), [("49", True), ("50", True), ("51", False)])
def test_max_gross_exposure(qty: str, ok: bool) -> None:
    state = AccountRiskState()
    state.positions["MSFT"] = PositionState(D("50"), D("190"))  # 50 x 200 = 10,000
    d = decide(order(qty), state, max_gross_exposure=15_000)  # room 5,000 = 50 AAPL at 100
    assert (d.decision == "approve") is ok
    if not ok:
        assert d.reason == "max_gross_exposure 15000 exceeded: would be 15100"


def test_max_gross_exposure_reducing_order_passes_when_over() -> None:
    state = AccountRiskState()
    state.positions["AAPL"] = PositionState(D("300"), D("100"))
    assert decide(order("100", Side.SELL), state, max_gross_exposure=1_000).decision == "approve"


def _losing_state(loss: str) -> AccountRiskState:
    # long 100 AAPL at 100 + loss/100: marked at 100 the unrealised loss is `loss`
    s = AccountRiskState()
    s.positions["AAPL"] = PositionState(D("100"), D("100") + D(loss) / 100)
    return s


@pytest.mark.parametrize(("loss", "ok"), [("999.99", True), ("1000", False), ("1000.01", False)])
def test_max_daily_loss_unrealised(loss: str, ok: bool) -> None:
    d = decide(order("10", symbol="MSFT"), _losing_state(loss), max_daily_loss=1000)
    assert (d.decision == "approve") is ok
    if not ok:
        assert d.rule == "max_daily_loss"
        assert d.reason == f"max_daily_loss 1000 reached: day P&L -{loss}"


def test_max_daily_loss_realised_today_and_reducing_orders() -> None:
    s = AccountRiskState()
    s.apply_exec(fill("AAPL", Side.BUY, "100", "110"))
    s.apply_exec(fill("AAPL", Side.SELL, "50", "90"))  # realised -1000
    assert s.realised == D("-1000")
    # 50 left at avg 110, marked 100: unrealised -500; total -1500
    assert decide(order("1", symbol="MSFT"), s, max_daily_loss=1500).decision == "reject"
    assert decide(order("1", symbol="MSFT"), s, max_daily_loss=1501).decision == "approve"
    # reducing the losing position is still allowed
    assert decide(order("50", Side.SELL), s, max_daily_loss=1500).decision == "approve"
    assert decide(order("51", Side.SELL), s, max_daily_loss=1500).decision == "reject"
    # the next day the realised part is gone
    next_day = datetime(2026, 11, 19, 15, 0, tzinfo=UTC)
    assert decide(order("1", symbol="MSFT", t=next_day), s, max_daily_loss=1000).decision == "approve"


@pytest.mark.parametrize(
    ("limit", "ok"), [("104.99", True), ("105", True), ("105.01", False), ("95", True), ("94.99", False)]
)
def test_price_collar(limit: str, ok: bool) -> None:
    d = decide(order("1", limit=limit), price_collar_pct=5)
    assert (d.decision == "approve") is ok
    if not ok:
        assert d.rule == "price_collar_pct"
        assert d.reason is not None and d.reason.startswith(
            f"price_collar_pct 5 exceeded: limit price {limit} is"
        )


def test_price_collar_without_reference_and_market_orders() -> None:
    assert (
        check(
            order("1", symbol="ZZZ", limit="1"), Limits(price_collar_pct=1), AccountRiskState(), {}
        ).decision
        == "approve"
    )
    assert decide(order("1"), price_collar_pct=1).decision == "approve"


def test_allowed_and_blocked_symbols() -> None:
    assert decide(order(symbol="MSFT"), allowed_symbols=["msft", "AAPL"]).decision == "approve"
    d = decide(order(symbol="TSLA"), allowed_symbols=["MSFT"])
    assert d.decision == "reject" and d.reason == "allowed_symbols: TSLA is not an allowed symbol"
    d = decide(order(symbol="TSLA"), blocked_symbols=["tsla"])
    assert d.decision == "reject" and d.reason == "blocked_symbols: TSLA is blocked"
    assert decide(order(symbol="MSFT"), blocked_symbols=["TSLA"]).decision == "approve"
    assert decide(order(symbol="MSFT"), allowed_symbols=[]).decision == "reject"


def test_trading_hours() -> None:
    assert decide(order(t=CLOSED_T), trading_hours="any").decision == "approve"
    assert decide(order(t=OPEN_T), trading_hours="regular").decision == "approve"
    d = decide(order(t=CLOSED_T), trading_hours="regular")
    assert d.decision == "reject" and d.rule == "trading_hours"
    # 09:29:59 and 09:30 New York on a session day
    assert (
        decide(order(t=datetime(2026, 11, 18, 14, 29, 59, tzinfo=UTC)), trading_hours="regular").decision
        == "reject"
    )
    assert (
        decide(order(t=datetime(2026, 11, 18, 14, 30, tzinfo=UTC)), trading_hours="regular").decision
        == "approve"
    )
    # crypto trades at any hour
    marks = {"@BTCUSD": D("50000")}
    crypto = order("1", symbol="@BTCUSD", t=CLOSED_T)
    assert check(crypto, Limits(trading_hours="regular"), AccountRiskState(), marks).decision == "approve"


def test_kill_switch_beats_everything() -> None:
    d = check(order(), Limits(), AccountRiskState(), MARKS, kill_reason="ops says stop")
    assert (
        d.decision == "reject"
        and d.rule == "kill_switch"
        and d.reason == "kill switch engaged: ops says stop"
    )


# --- clipping ------------------------------------------------------------------------------------------


def test_clip_to_limits_takes_the_tightest_quantity_limit() -> None:
    state = _state_with(pos="300")
    d = decide(order("400"), state, max_order_qty=350, max_position_qty=500, clip_to_limits=True)
    assert d.decision == "clip" and d.qty == D("200") and d.rule == "max_order_qty"
    d = decide(order("400", limit="100"), state, max_order_notional=15_050, clip_to_limits=True)
    assert d.decision == "clip" and d.qty == D("150")
    # nothing fits: reject with the rule
    d = decide(order("10"), _state_with(pos="500"), max_position_qty=500, clip_to_limits=True)
    assert d.decision == "reject" and d.reason == "max_position_qty 500 exceeded: would be 510"


def test_clip_gross_exposure_and_notional_order() -> None:
    d = decide(order("100"), max_gross_exposure=5_050, clip_to_limits=True)
    assert d.decision == "clip" and d.qty == D("50")
    d = decide(order(None, notional="20000"), max_order_notional=10_000, clip_to_limits=True)
    assert d.decision == "clip" and d.qty is None and d.notional == D("10000.00")


def test_clip_floors_to_lot_for_crypto() -> None:
    marks = {"@BTCUSD": D("30000")}
    o = order("1", symbol="@BTCUSD")
    d = check(o, Limits(max_order_notional=1000, clip_to_limits=True), AccountRiskState(), marks)
    assert d.decision == "clip" and d.qty == D("0.0333")


def test_no_limits_approves() -> None:
    assert decide(order("1000000")).decision == "approve"


# --- bookkeeping ------------------------------------------------------------------------------------


def test_reserve_fill_release_and_replace() -> None:
    s = AccountRiskState()
    o1 = order("100", limit="100")
    d = check(o1, Limits(), s, MARKS)
    reserve_for(s, o1, d, MARKS)
    assert s.open_qty("AAPL") == (D("100"), D("0"))
    s.apply_exec(fill("AAPL", Side.BUY, "40", "100", oid=o1.order_id))
    assert s.open_qty("AAPL") == (D("60"), D("0"))
    assert s.position_qty("AAPL") == D("40")
    # replace o1 by o2 for 80: the old reservation goes
    o2 = order("80", limit="101", replaces=o1.order_id)
    reserve_for(s, o2, check(o2, Limits(), s, MARKS), MARKS)
    assert s.open_qty("AAPL") == (D("80"), D("0"))
    cancel = ExecReport(
        exec=ExecType.CANCELED,
        seq=3,
        order_id=o2.order_id,
        account_id=ACCOUNT,
        symbol="AAPL",
        side=Side.BUY,
        t=OPEN_T,
    )
    effect = s.apply_exec(cancel)
    assert effect.orders == [(str(o2.order_id), None)]
    assert s.open_qty("AAPL") == (D("0"), D("0"))
    assert s.apply_exec(cancel).empty


@pytest.mark.parametrize("kind", list(ExecType))
def test_a_report_that_cannot_change_the_state_changes_nothing_on_any_state(kind: ExecType) -> None:
    """`can_change` is what the service acks without Redis: false only where `apply_exec` leaves every
    state as it was (here: states with the order open, filled in part, with positions, or empty)."""
    rng = random.Random(str(kind))
    for _ in range(40):
        s = AccountRiskState()
        orders = [order(str(rng.randint(1, 50)), side=rng.choice(list(Side)), limit="100") for _ in range(2)]
        for o in orders:
            reserve_for(s, o, check(o, Limits(), s, MARKS), MARKS)
        if rng.random() < 0.5:
            s.apply_exec(fill("AAPL", Side.BUY, "1", "99", oid=orders[0].order_id))
        qty = rng.choice([None, D("0"), D("-1"), D("1"), D("3")])
        r = ExecReport(
            exec=kind,
            seq=9,
            order_id=rng.choice([*(o.order_id for o in orders), uuid.uuid4()]),
            account_id=ACCOUNT,
            symbol="AAPL",
            side=Side.BUY,
            t=OPEN_T,
            exec_id=uuid.uuid4().hex if kind is ExecType.FILL else None,
            price=rng.choice([None, D("101")]),
            qty=qty,
        )
        before = (dict(s.open_orders), dict(s.positions), s.day, s.realised, s.open_qty("AAPL"))
        effect = s.apply_exec(r)
        if not can_change(r):
            assert effect.empty
            assert (dict(s.open_orders), dict(s.positions), s.day, s.realised, s.open_qty("AAPL")) == before
    assert can_change(fill("AAPL", Side.BUY, "1", "1"))
    assert not can_change(msgspec.structs.replace(fill("AAPL", Side.BUY, "1", "1"), exec=ExecType.ACCEPTED))


def test_replace_does_not_count_the_replaced_order() -> None:
    s = AccountRiskState()
    o1 = order("500")
    reserve_for(s, o1, check(o1, Limits(max_position_qty=500), s, MARKS), MARKS)
    o2 = order("500", replaces=o1.order_id)
    assert check(o2, Limits(max_position_qty=500), s, MARKS).decision == "approve"


@pytest.mark.parametrize("seed", range(120))
def test_a_replace_is_decided_as_if_the_replaced_order_were_gone(seed: int) -> None:
    """The rules take the replaced order off its symbol's worst range (no copy of the state): the same
    decisions as on a state from which it was released, with or without marks, clipping, on either
    side, and when the replacement names another symbol."""
    rng = random.Random(seed)
    s = AccountRiskState()
    for _ in range(rng.randint(0, 3)):
        s.apply_exec(
            fill(rng.choice(["AAPL", "MSFT"]), rng.choice(list(Side)), str(rng.randint(1, 300)), "90")
        )
    ids = []
    for _ in range(rng.randint(1, 6)):
        oid = str(uuid.uuid4())
        price = None if rng.random() < 0.3 else D(rng.randint(80, 120))
        s.reserve(
            oid,
            rng.choice(["AAPL", "AAPL", "MSFT"]),
            rng.choice(list(Side)),
            D(rng.randint(1, 400)),
            price,
            None,
        )
        ids.append(oid)
    old = rng.choice(ids)
    symbol = s.open_orders[old].symbol if rng.random() < 0.85 else "TSLA"
    new = order(str(rng.randint(1, 600)), side=rng.choice(list(Side)), symbol=symbol, replaces=uuid.UUID(old))
    limits = Limits(
        max_position_qty=D(rng.randint(100, 800)),
        max_gross_exposure=D(rng.randint(10_000, 120_000)) if rng.random() < 0.8 else None,
        clip_to_limits=rng.random() < 0.5,
    )
    marks = {k: v for k, v in MARKS.items() if rng.random() < 0.6}
    without = s.copy()
    without.release(old)
    assert check(new, limits, s, marks) == check(new, limits, without, marks)


def test_position_average_and_flip() -> None:
    s = AccountRiskState()
    s.apply_exec(fill("AAPL", Side.BUY, "10", "100"))
    s.apply_exec(fill("AAPL", Side.BUY, "10", "110"))
    assert s.positions["AAPL"] == PositionState(D("20"), D("105"))
    s.apply_exec(fill("AAPL", Side.SELL, "30", "120"))  # close 20 (+300), open short 10 at 120
    assert s.positions["AAPL"] == PositionState(D("-10"), D("120"))
    assert s.realised == D("300")
    s.apply_exec(fill("AAPL", Side.BUY, "10", "125"))  # -50
    assert "AAPL" not in s.positions and s.realised == D("250")


def test_token_bucket() -> None:
    ok, b = take(None, 0.0, 2.0)
    assert ok
    ok, b = take(b, 0.0, 2.0)
    assert ok
    ok, b = take(b, 0.1, 2.0)  # 0.2 tokens
    assert not ok
    ok, b = take(b, 0.5, 2.0)  # 1.0 token
    assert ok


def test_engine_rate_limit_is_throttled() -> None:
    eng = RiskEngine(Limits(max_orders_per_second=3))
    results = [eng.check(order("1"), MARKS) for _ in range(4)]
    assert [r.decision for r in results] == ["approve", "approve", "approve", "reject"]
    assert results[-1].throttled and results[-1].reason == "max_orders_per_second 3 exceeded"
    eng.kill("halt")
    assert eng.check(order("1"), MARKS).rule == "kill_switch"


# --- the limits model ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"max_order_qty": -1}, "max_order_qty"),
        ({"max_order_qty": 0}, "max_order_qty"),
        ({"max_order_notional": "abc"}, "max_order_notional"),
        ({"max_daily_loss": -5}, "max_daily_loss"),
        ({"price_collar_pct": "NaN"}, "price_collar_pct"),
        ({"allowed_symbols": "AAPL"}, "allowed_symbols"),
        ({"blocked_symbols": ["not a symbol!"]}, "blocked_symbols"),
        ({"trading_hours": "sometimes"}, "trading_hours"),
        ({"max_positon_qty": 5}, "max_positon_qty"),
    ],
)
def test_limits_validation_names_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Limits.model_validate(payload)
    assert field in str(info.value)


def test_limits_accept_strings_and_numbers_exactly() -> None:
    lim = Limits.model_validate(
        {"max_order_notional": 100.1, "max_order_qty": "5", "blocked_symbols": ["brk.b"]}
    )
    assert lim.max_order_notional == D("100.1") and lim.max_order_qty == D("5")
    assert lim.blocked_symbols == ["BRK.B"]
    assert Limits().unlimited and not lim.unlimited


@pytest.mark.parametrize(
    ("utc", "ny_day"),
    [
        ("2026-03-08T04:59:59.999999", "2026-03-07"),  # the night clocks spring forward (EST)
        ("2026-03-08T05:00:00", "2026-03-08"),
        ("2026-03-09T03:59:59.999999", "2026-03-08"),  # the first EDT midnight is at 04:00 UTC
        ("2026-03-09T04:00:00", "2026-03-09"),
        ("2026-11-01T03:59:59", "2026-10-31"),
        ("2026-11-01T04:00:00", "2026-11-01"),
        ("2026-11-02T04:59:59", "2026-11-01"),  # back to EST: midnight at 05:00 UTC
        ("2026-11-02T05:00:00", "2026-11-02"),
    ],
)
def test_session_day_is_the_new_york_date_across_daylight_saving(utc: str, ny_day: str) -> None:
    from datetime import date, timedelta

    from papertrade.risk import session_day

    t = datetime.fromisoformat(utc).replace(tzinfo=UTC)
    # asked after a neighbouring instant (the day it remembers) and on its own
    for before in (t - timedelta(hours=3), t + timedelta(hours=3), t):
        session_day(before)
        assert session_day(t) == date.fromisoformat(ny_day)
    # an instant in another zone, and a different UTC day afterwards
    assert session_day(
        t.astimezone(datetime.fromisoformat("2026-01-01T00:00:00+09:00").tzinfo)
    ) == date.fromisoformat(ny_day)
