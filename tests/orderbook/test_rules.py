"""Every rule of the matching engine (issue 3), through the decimal OrderBook API."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest

from papertrade.book import ExpireDayCmd, OrderBook, QuoteCmd
from papertrade.book.liquidity import LiquidityConfig, Rung, ladder, reconcile
from papertrade.enums import ExecType, Side
from papertrade.messages import CancelCmd, NewOrderCmd
from tests.orderbook.helpers import T0, A, B, Harness, fills, kinds, oid, only


@pytest.fixture
def h(engine: Any) -> Harness:
    """Every rule runs on the pure engine and on the compiled one (when built)."""
    return Harness(engine=engine)


# --- limit orders, priority, prints -----------------------------------------------------------------


def test_limit_rests_and_depth_is_best_first(h: Harness) -> None:
    assert kinds(h.new(1, "buy", 10, "99.98")) == ["accepted"]
    h.new(2, "buy", 5, "99.99")
    h.new(3, "sell", 7, "100.02")
    h.new(4, "sell", 3, "100.01")
    assert h.bids() == [("99.99", "5", 1), ("99.98", "10", 1)]
    assert h.asks() == [("100.01", "3", 1), ("100.02", "7", 1)]
    assert h.book.top() == ((Decimal("99.99"), Decimal(5)), (Decimal("100.01"), Decimal(3)))
    assert h.book.spread() == Decimal("0.02")
    assert h.book.level(Side.SELL, 1) == (Decimal("100.02"), Decimal(7), 1)
    assert h.book.level(Side.SELL, 2) is None


def test_empty_book_answers_none() -> None:
    b = OrderBook("AAPL")
    assert b.top() == (None, None)
    assert b.spread() is None
    assert b.level(Side.BUY, 0) is None
    assert b.levels(Side.SELL) == []
    assert b.last_price is None
    assert b.find(oid(1)) is None
    assert b.depth()["bids"] == [] and b.depth()["last_price"] is None


def test_price_time_priority_and_one_execution_per_maker_at_resting_price(h: Harness) -> None:
    h.new(1, "sell", 5, "100.01")
    h.new(2, "sell", 5, "100.01")
    h.new(3, "sell", 5, "100.00")
    out = h.new(4, "buy", 12, "100.05")
    # best price first, then time priority within the level; each print at the maker's price
    assert fills(out) == [("100.00", "5"), ("100.01", "5"), ("100.01", "2")]
    makers = [
        r.order_id for r in out if r.exec is ExecType.FILL and r.liquidity and r.liquidity.value == "maker"
    ]
    assert makers == [oid(3), oid(1), oid(2)]
    assert h.asks() == [("100.01", "3", 1)]
    assert h.book.last_price == Decimal("100.01")
    taker_last = [r for r in out if r.exec is ExecType.FILL and r.order_id == oid(4)][-1]
    assert taker_last.cum_qty == 12 and taker_last.leaves_qty == 0
    ids = [r.exec_id for r in out if r.exec_id]
    assert len(ids) == len(set(ids))


def test_aggressive_limit_remainder_rests_at_its_limit(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00")
    out = h.new(2, "buy", 8, "100.01")
    assert fills(out) == [("100.00", "5")]
    assert h.bids() == [("100.01", "3", 1)]
    assert h.asks() == []


def test_prints_one_per_execution(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00")
    h.new(2, "sell", 5, "100.01")
    h.new(3, "buy", 7)
    prints = h.book.take_prints()
    assert [(str(p.price), str(p.qty), p.aggressor_side.value) for p in prints] == [
        ("100.00", "5", "buy"),
        ("100.01", "2", "buy"),
    ]
    assert h.book.take_prints() == []


# --- market and notional ----------------------------------------------------------------------------


def test_market_order_remainder_canceled(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00")
    out = h.new(2, "buy", 8)
    assert kinds(out) == ["accepted", "fill", "fill", "canceled"]
    c = only(out, "canceled")
    assert c.leaves_qty == 3 and c.cum_qty == 5 and "market" in (c.reason or "")


def test_market_order_on_empty_book_is_canceled(h: Harness) -> None:
    out = h.new(1, "sell", 5)
    assert kinds(out) == ["accepted", "canceled"]
    assert h.asks() == [] and h.bids() == []


def test_notional_market_buy_spends_at_most_the_amount(h: Harness) -> None:
    h.new(1, "sell", 3, "100.00")
    h.new(2, "sell", 10, "101.00")
    out = h.new(3, "buy", notional="500")
    # 3 @ 100 = 300, then 1 @ 101 = 101 (total 401 <= 500; a second share at 101 would be 502)
    assert fills(out) == [("100.00", "3"), ("101.00", "1")]
    assert kinds(out)[-1] == "fill"
    assert only(out, "accepted").qty == 4


def test_notional_crypto_fractional_lots() -> None:
    h = Harness("@BTCUSD")
    h.new(1, "sell", "2", "50000.00")
    out = h.new(2, "buy", notional="100")
    assert fills(out) == [("50000.00", "0.0020")]


def test_notional_too_small_or_no_liquidity(h: Harness) -> None:
    out = h.new(1, "buy", notional="50")
    assert kinds(out) == ["accepted", "canceled"]
    h.new(2, "sell", 1, "100.00")
    out = h.new(3, "buy", notional="50")
    assert kinds(out) == ["accepted", "canceled"]
    assert h.asks() == [("100.00", "1", 1)]


def test_notional_only_for_market(h: Harness) -> None:
    out = h.new(1, "buy", notional="50", price="10.00", type="limit")
    assert kinds(out) == ["rejected"]


# --- time in force and flags ------------------------------------------------------------------------


def test_ioc_fills_what_it_can_and_cancels_rest(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00")
    out = h.new(2, "buy", 8, "100.00", tif="ioc")
    assert fills(out) == [("100.00", "5")]
    assert only(out, "canceled").leaves_qty == 3
    assert h.bids() == []


def test_ioc_not_marketable_is_canceled(h: Harness) -> None:
    h.new(1, "sell", 5, "100.01")
    out = h.new(2, "buy", 8, "100.00", tif="ioc")
    assert kinds(out) == ["accepted", "canceled"]
    assert h.bids() == []


def test_fok_fills_entirely_across_levels(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00")
    h.new(2, "sell", 5, "100.01")
    out = h.new(3, "buy", 8, "100.01", tif="fok")
    assert fills(out) == [("100.00", "5"), ("100.01", "3")]


def test_killed_fok_leaves_the_book_exactly_as_it_was(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00")
    h.new(2, "sell", 5, "100.01")
    h.new(3, "sell", 5, "100.02")
    before = h.book.snapshot()
    out = h.new(4, "buy", 11, "100.01", tif="fok")
    assert kinds(out) == ["accepted", "canceled"]
    assert h.book.snapshot() == before
    assert h.book.last_price is None
    out = h.new(5, "buy", 100, tif="fok")  # market FOK: not enough on the whole book
    assert kinds(out) == ["accepted", "canceled"]
    assert h.book.snapshot() == before


def test_aon_fills_against_head_order_only(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00")
    h.new(2, "sell", 20, "100.00")
    out = h.new(3, "buy", 8, "100.00", aon=True)
    # the head order has 5 < 8: no queue skipping, the AON order is canceled, book unchanged
    assert kinds(out) == ["accepted", "canceled"]
    assert h.asks() == [("100.00", "25", 2)]
    out = h.new(4, "buy", 5, "100.00", aon=True)
    assert fills(out) == [("100.00", "5")]
    assert h.asks() == [("100.00", "20", 1)]


def test_aon_never_rests_and_needs_best_price_head(h: Harness) -> None:
    out = h.new(1, "buy", 5, "100.00", aon=True, tif="gtc")
    assert kinds(out) == ["accepted", "canceled"]
    assert h.bids() == []
    h.new(2, "sell", 3, "100.00")
    h.new(3, "sell", 50, "100.01")
    out = h.new(4, "buy", 5, "100.01", aon=True, tif="day")  # head at best (100.00) has only 3
    assert kinds(out) == ["accepted", "canceled"]
    out = h.new(5, "buy", 3, aon=True)  # market AON against a big enough head
    assert fills(out) == [("100.00", "3")]


# --- stops ------------------------------------------------------------------------------------------


def test_stops_are_dormant_until_first_trade_and_not_in_depth(h: Harness) -> None:
    out = h.new(1, "buy", 5, stop="100.00")
    assert kinds(out) == ["accepted"]
    assert h.bids() == [] and h.asks() == []
    found = h.book.find(oid(1))
    assert found is not None and found["state"] == "dormant"
    # liquidity arrives but nothing traded yet: the stop stays dormant
    h.new(2, "sell", 10, "100.50")
    assert h.book.find(oid(1))["state"] == "dormant"  # type: ignore[index]
    # the first trade at 100.50 >= 100.00 fires it after the triggering order completes
    out = h.new(3, "buy", 1)
    assert kinds(out) == ["accepted", "fill", "fill", "triggered", "fill", "fill"]
    assert fills(out) == [("100.50", "1"), ("100.50", "5")]
    assert h.book.find(oid(1)) is None


def test_sell_stop_triggers_on_last_at_or_below(h: Harness) -> None:
    h.new(1, "buy", 10, "99.00")
    h.new(2, "sell", 1, "99.50")
    h.new(3, "buy", 1, "99.50")  # trade at 99.50
    out = h.new(4, "sell", 5, stop="99.40")
    assert kinds(out) == ["accepted"]  # 99.50 > 99.40: dormant
    h.new(5, "buy", 1, "99.40")
    out = h.new(6, "sell", 1, "99.40")  # trade at 99.40 <= 99.40
    assert "triggered" in kinds(out)
    assert fills(out)[-1] == ("99.00", "5")


def test_stop_already_satisfied_fires_at_once(h: Harness) -> None:
    h.new(1, "sell", 10, "100.00")
    h.new(2, "buy", 1)  # last = 100.00
    out = h.new(3, "buy", 2, stop="99.00")
    assert kinds(out) == ["accepted", "triggered", "fill", "fill"]


def test_stops_fire_in_entry_order(h: Harness) -> None:
    h.new(1, "sell", 3, "100.00")
    h.new(2, "sell", 3, "100.01")
    h.new(10, "buy", 2, stop="100.00")
    h.new(11, "buy", 2, stop="99.50")
    out = h.new(3, "buy", 1, "100.00")  # last 100.00 satisfies both
    triggered = [r.order_id for r in out if r.exec is ExecType.TRIGGERED]
    assert triggered == [oid(10), oid(11)]
    assert fills(out) == [("100.00", "1"), ("100.00", "2"), ("100.01", "2")]


def test_stop_limit_rests_after_trigger(h: Harness) -> None:
    h.new(1, "sell", 1, "100.00")
    h.new(2, "sell", 5, "100.10")
    h.new(3, "buy", 4, "100.05", stop="100.00")
    out = h.new(4, "buy", 1)
    assert "triggered" in kinds(out)
    assert h.bids() == [("100.05", "4", 1)]


def test_stop_cascade(h: Harness) -> None:
    h.new(1, "buy", 1, "99.00")
    h.new(2, "buy", 1, "98.00")
    h.new(3, "buy", 1, "97.00")
    h.new(10, "sell", 1, stop="99.00")  # fires on 99 -> trades at 98 -> fires 11
    h.new(11, "sell", 1, stop="98.00")
    out = h.new(4, "sell", 1, "99.00")
    assert [r.order_id for r in out if r.exec is ExecType.TRIGGERED] == [oid(10), oid(11)]
    assert h.book.last_price == Decimal("97.00")


def test_cancel_dormant_stop(h: Harness) -> None:
    h.new(1, "buy", 5, stop="100.00")
    out = h.cancel(1)
    assert kinds(out) == ["canceled"]
    assert h.book.find(oid(1)) is None


# --- cancel / replace -------------------------------------------------------------------------------


def test_cancel_resting_and_unknown(h: Harness) -> None:
    h.new(1, "buy", 5, "99.00")
    out = h.cancel(1)
    assert kinds(out) == ["canceled"] and out[0].leaves_qty == 5
    assert h.bids() == []
    out = h.cancel(1)
    assert kinds(out) == ["rejected"] and out[0].command == "cancel"


def test_replace_qty_down_keeps_priority(h: Harness) -> None:
    h.new(1, "sell", 10, "100.00")
    h.new(2, "sell", 10, "100.00")
    out = h.replace(1, 3, qty=6)
    assert kinds(out) == ["replaced", "accepted"]
    assert out[0].order_id == oid(1) and out[0].new_order_id == oid(3) and out[0].reason == "priority kept"
    out = h.new(4, "buy", 6)
    makers = [r.order_id for r in out if r.liquidity and r.liquidity.value == "maker"]
    assert makers == [oid(3)]
    assert h.asks() == [("100.00", "10", 1)]


def test_replace_qty_up_or_price_change_loses_priority(h: Harness) -> None:
    h.new(1, "sell", 10, "100.00")
    h.new(2, "sell", 10, "100.00")
    h.replace(1, 3, qty=12)
    out = h.new(4, "buy", 5)
    assert [r.order_id for r in out if r.liquidity and r.liquidity.value == "maker"] == [oid(2)]
    h.replace(2, 5, price="100.00")  # same price counts as a price change request? no: unchanged -> keeps
    h.replace(3, 6, price="100.01")
    assert h.asks() == [("100.00", "5", 1), ("100.01", "12", 1)]


def test_replace_to_crossing_price_executes(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00")
    h.new(2, "buy", 5, "99.00")
    out = h.replace(2, 3, price="100.00")
    assert kinds(out) == ["replaced", "accepted", "fill", "fill"]
    assert h.asks() == [] and h.bids() == []


def test_replace_below_filled_is_rejected_and_book_untouched(h: Harness) -> None:
    h.new(1, "sell", 10, "100.00")
    h.new(2, "buy", 6)
    before = h.book.snapshot()
    out = h.replace(1, 3, qty=6)
    assert kinds(out) == ["rejected"] and out[0].command == "replace"
    assert h.book.snapshot() == before
    out = h.replace(1, 3, qty=8)  # above filled: leaves 2, priority kept
    assert kinds(out) == ["replaced", "accepted"]
    assert h.asks() == [("100.00", "2", 1)]
    assert out[1].cum_qty == 6 and out[1].leaves_qty == 2


def test_replace_unknown_and_filled(h: Harness) -> None:
    assert kinds(h.replace(9, 10, qty=5)) == ["rejected"]
    h.new(1, "sell", 1, "100.00")
    h.new(2, "buy", 1)
    assert kinds(h.replace(1, 3, qty=5)) == ["rejected"]


def test_replace_dormant_stop(h: Harness) -> None:
    h.new(1, "buy", 5, stop="101.00")
    out = h.replace(1, 2, stop="102.00")
    assert kinds(out) == ["replaced", "accepted"]
    assert h.book.find(oid(2))["stop_price"] == Decimal("102.00")  # type: ignore[index]


# --- self-trade prevention --------------------------------------------------------------------------


def test_stp_none_allows_self_trade(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00")
    assert fills(h.new(2, "buy", 5, "100.00")) == [("100.00", "5")]


def test_stp_cancel_newest(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00", account=B)
    h.new(2, "sell", 5, "100.00", account=A)
    h.new(3, "sell", 5, "100.00", account=B)
    out = h.new(4, "buy", 15, "100.00", account=A, stp="cancel_newest")
    assert fills(out) == [("100.00", "5")]
    c = only(out, "canceled")
    assert c.order_id == oid(4) and c.leaves_qty == 10 and "self-trade" in (c.reason or "")
    assert h.asks() == [("100.00", "10", 2)]
    assert h.bids() == []


def test_stp_cancel_oldest(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00", account=A)
    h.new(2, "sell", 5, "100.00", account=B)
    out = h.new(3, "buy", 5, "100.00", account=A, stp="cancel_oldest")
    assert only(out, "canceled").order_id == oid(1)
    assert fills(out) == [("100.00", "5")]
    assert h.asks() == []


def test_stp_cancel_both(h: Harness) -> None:
    h.new(1, "sell", 5, "100.00", account=A)
    h.new(2, "sell", 5, "100.00", account=B)
    out = h.new(3, "buy", 5, "100.00", account=A, stp="cancel_both")
    assert sorted(r.order_id for r in out if r.exec is ExecType.CANCELED) == [oid(1), oid(3)]
    assert h.asks() == [("100.00", "5", 1)]
    assert h.bids() == []


# --- DAY expiry -------------------------------------------------------------------------------------


def test_expire_day_orders_at_close(h: Harness) -> None:
    h.new(1, "buy", 5, "99.00", tif="day")
    h.new(2, "buy", 5, "98.00", tif="gtc")
    h.new(3, "sell", 5, stop="90.00", tif="day")
    close = T0 + timedelta(hours=6)
    h.new(4, "buy", 5, "97.00", tif="day", t=close + timedelta(hours=1))  # entered after the close
    out = h.apply(ExpireDayCmd(symbol="AAPL", t=close))
    assert kinds(out) == ["expired", "expired"]
    assert {r.order_id for r in out} == {oid(1), oid(3)}
    assert h.bids() == [("98.00", "5", 1), ("97.00", "5", 1)]


# --- bad commands -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qty", "price", "why"),
    [
        ("0", "100.00", "qty"),
        ("-5", "100.00", "qty"),
        ("NaN", "100.00", "qty"),
        ("1e15", "100.00", "qty"),
        ("1.5", "100.00", "lot"),
        ("5", "100.001", "tick"),
        ("5", "-1", "limit_price"),
        ("5", "Infinity", "limit_price"),
    ],
)
def test_bad_new_orders_are_rejected_and_book_untouched(h: Harness, qty: str, price: str, why: str) -> None:
    h.new(1, "sell", 5, "100.00")
    before = h.book.snapshot()
    out = h.new(2, "buy", qty, price)
    assert kinds(out) == ["rejected"]
    assert why in (out[0].reason or "")
    assert h.book.snapshot() == before


def test_inconsistent_types_rejected(h: Harness) -> None:
    assert kinds(h.new(1, "buy", 5, "100.00", type="market")) == ["rejected"]
    assert kinds(h.new(2, "buy", 5, type="limit")) == ["rejected"]
    assert kinds(h.new(3, "buy", 5, type="stop")) == ["rejected"]
    assert kinds(h.new(4, "buy", 5, "1.00", stop="1.00", type="limit")) == ["rejected"]
    assert kinds(h.apply(_dup(h))) == ["rejected"]


def test_wrong_symbol_rejected() -> None:
    h = Harness("AAPL")
    cmd = CancelCmd(order_id=oid(1), account_id=A, symbol="MSFT", t=T0)
    assert kinds(h.apply(cmd)) == ["rejected"]


def test_reports_are_numbered_and_deterministic() -> None:
    def run() -> bytes:
        from papertrade.codec import encode

        h = Harness()
        out = []
        out += h.new(1, "sell", 5, "100.00")
        out += h.new(2, "buy", 5, stop="100.00")
        out += h.new(3, "sell", 5, "100.01")
        out += h.new(4, "buy", 7)
        out += h.cancel(3)
        assert [r.seq for r in out] == list(range(1, len(out) + 1))
        return b"\n".join(encode(r) for r in out)

    assert run() == run()


def test_quote_replaces_a_ladder_as_one_command(h: Harness) -> None:
    """The maker's cancels and places are one command: the next order meets the new ladder whole,
    never the gap between them (a market buy once found no asks at all), in the order given."""
    h.new(1, "sell", 100, "100.05", account=B)
    h.new(2, "buy", 100, "99.95", account=B)

    def place(n: int, side: str, qty: int, price: str, account: UUID = B) -> NewOrderCmd:
        return NewOrderCmd(
            order_id=oid(n),
            account_id=account,
            symbol="AAPL",
            side=Side(side),
            type="limit",  # type: ignore[arg-type]
            time_in_force="gtc",  # type: ignore[arg-type]
            t=T0,
            qty=Decimal(qty),
            limit_price=Decimal(price),
        )

    quote = QuoteCmd(
        symbol="AAPL",
        account_id=B,
        t=T0,
        cancels=(oid(1), oid(2), oid(99)),
        places=(
            place(3, "sell", 100, "101.05"),
            place(4, "buy", 100, "100.95"),
            place(5, "sell", 1, "102", A),
        ),
        reason="liquidity re-quote",
    )
    out = h.apply(quote)
    assert [(r.order_id, r.exec.value) for r in out] == [
        (oid(1), "canceled"),
        (oid(2), "canceled"),
        (oid(99), "rejected"),  # an unknown id is refused on its own, the rest goes on
        (oid(3), "accepted"),
        (oid(4), "accepted"),
        (oid(5), "rejected"),  # not the quoting account's order
    ]
    assert out[0].reason == "liquidity re-quote"
    assert "holds an order of" in (out[5].reason or "")
    assert h.bids() == [("100.95", "100", 1)] and h.asks() == [("101.05", "100", 1)]
    assert fills(h.new(6, "buy", 10)) == [("101.05", "10")]
    other = QuoteCmd(symbol="MSFT", account_id=B, t=T0, cancels=(oid(3),))
    assert kinds(h.apply(other)) == ["rejected"] and h.asks() == [("101.05", "90", 1)]


# --- liquidity model --------------------------------------------------------------------------------


def test_ladder_is_symmetric_on_grid_and_uncrossed() -> None:
    cfg = LiquidityConfig(spread_bps=Decimal(10), levels=3, size=Decimal(100), step_bps=Decimal(5))
    rungs = ladder(Decimal("100"), cfg, Decimal("0.01"), Decimal("1"))
    bids = [r.price for r in rungs if r.side is Side.BUY]
    asks = [r.price for r in rungs if r.side is Side.SELL]
    assert bids == [Decimal("99.95"), Decimal("99.90"), Decimal("99.85")]
    assert asks == [Decimal("100.05"), Decimal("100.10"), Decimal("100.15")]
    tiny = ladder(Decimal("0.02"), cfg, Decimal("0.01"), Decimal("1"))
    tb = [r.price for r in tiny if r.side is Side.BUY]
    ta = [r.price for r in tiny if r.side is Side.SELL]
    assert max(tb) < min(ta) and len(set(ta)) == len(ta) and all(p > 0 for p in tb)
    assert ladder(Decimal(0), cfg, Decimal("0.01"), Decimal("1")) == []


def test_reconcile_keeps_matching_orders() -> None:
    target = [Rung(Side.BUY, Decimal("99"), Decimal(100)), Rung(Side.SELL, Decimal("101"), Decimal(100))]
    resting = [
        ("a", Side.BUY, Decimal("99"), Decimal(100)),
        ("b", Side.SELL, Decimal("102"), Decimal(100)),
        ("c", Side.BUY, Decimal("99"), Decimal(100)),
    ]
    cancels, places = reconcile(resting, target)
    assert cancels == ["b", "c"]
    assert places == [target[1]]
    cancels, places = reconcile([("a", Side.BUY, Decimal("99"), Decimal(10))], target)
    assert cancels == ["a"] and len(places) == 2


def _dup(h: Harness) -> NewOrderCmd:
    h.new(50, "buy", 1, "1.00")
    return NewOrderCmd(
        order_id=oid(50),
        account_id=UUID(int=1),
        symbol="AAPL",
        side=Side.BUY,
        type="limit",  # type: ignore[arg-type]
        time_in_force="gtc",  # type: ignore[arg-type]
        t=T0,
        qty=Decimal(1),
        limit_price=Decimal("1.00"),
    )
