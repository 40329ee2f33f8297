"""Hypothesis: the engine's invariants hold after every call on random command sequences.

- never crossed after a call; level totals and counts equal the sum of their live orders;
- per order, accepted = filled + open (resting or dormant) + canceled/expired (nothing appears or vanishes);
- the same commands give the same events (determinism), and the decimal layer agrees with the core.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from papertrade.book import engine as E
from tests.orderbook.conftest import ENGINES, engine_class

_op = st.one_of(
    st.tuples(
        st.just("new"),
        st.integers(0, 1),  # side
        st.sampled_from([E.LIMIT, E.LIMIT, E.LIMIT, E.MARKET, E.STOP, E.STOP_LIMIT]),
        st.integers(1, 20),  # lots
        st.integers(95, 105),  # tick
        st.integers(95, 105),  # stop tick
        st.sampled_from([E.GTC, E.DAY, E.IOC, E.FOK]),
        st.booleans(),  # aon (rarely)
        st.sampled_from([E.STP_NONE, E.STP_NONE, E.CANCEL_NEWEST, E.CANCEL_OLDEST, E.CANCEL_BOTH]),
        st.integers(0, 1),  # account
    ),
    st.tuples(st.just("cancel"), st.integers(0, 60)),
    st.tuples(st.just("replace"), st.integers(0, 60), st.integers(1, 25), st.integers(95, 105)),
    st.tuples(st.just("notional"), st.integers(0, 1), st.integers(1, 3000)),
    st.tuples(st.just("expire")),
)


def _run(
    ops: list[tuple[Any, ...]], check: bool, engine: Any = E.Book, scan_stops: bool = False
) -> list[tuple[Any, ...]]:
    """The events of `ops` on a new book; `scan_stops`: the stops' bounds opened before every command,
    so that every check of the stops scans them all (as the engine did before it kept bounds)."""
    book = engine()
    ledger: dict[Any, int] = defaultdict(int)
    next_id = 0
    trace: list[tuple[Any, ...]] = []
    for op in ops:
        if scan_stops:
            book._buy_stop_floor, book._sell_stop_ceiling = 0, E._INF
        if op[0] == "new":
            _, side, kind, lots, tick, stop, tif, aon, stp, acct = op
            next_id += 1
            book.submit(
                next_id,
                side,
                kind,
                lots,
                tick if kind in (E.LIMIT, E.STOP_LIMIT) else None,
                stop if kind >= E.STOP else None,
                tif,
                aon and next_id % 3 == 0,
                stp,
                acct,
            )
        elif op[0] == "cancel":
            book.cancel(op[1])
        elif op[0] == "replace":
            next_id += 1
            found = book.find(op[1])
            tick = op[3] if found is not None and found["tick"] is not None else None
            book.replace(op[1], next_id, op[2], tick)
        elif op[0] == "notional":
            next_id += 1
            book.submit(next_id, op[1], E.MARKET, 0, notional=op[2] * 10)
        else:
            book.expire_day()
        events = book.take_events()
        for ev in events:
            _account(ledger, ev)
            trace.append(_freeze(ev))
        if check:
            book.check()
            _check_ledger(book, ledger)
    return trace


def _account(ledger: dict[Any, int], ev: tuple[Any, ...]) -> None:
    kind = ev[0]
    if kind == E.EV_ACCEPTED:
        ledger[ev[1].oid] += ev[2]
    elif kind == E.EV_FILL:
        _, _, taker, maker, _tick, lots, *_ = ev
        assert lots > 0
        ledger[taker.oid] -= lots
        ledger[maker.oid] -= lots
    elif kind == E.EV_CANCELED:
        ledger[ev[1].oid] -= ev[3]
    elif kind == E.EV_EXPIRED:
        ledger[ev[1].oid] -= ev[2]
    elif kind == E.EV_REPLACED:
        ledger[ev[1]] = 0  # its open quantity moves to the new order (accepted next)


def _check_ledger(book: E.Book, ledger: dict[Any, int]) -> None:
    for oid, open_lots in ledger.items():
        found = book.find(oid)
        if found is None:
            assert open_lots == 0, (oid, open_lots)
        else:
            assert open_lots == found["leaves"], (oid, open_lots, found)
            assert found["leaves"] > 0


def _freeze(ev: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.oid if hasattr(x, "oid") else x for x in ev)


@pytest.mark.parametrize("name", ["pure", "native"])
@settings(max_examples=600, deadline=None)
@given(ops=st.lists(_op, min_size=1, max_size=80))
def test_invariants_hold_after_every_call(name: str, ops: list[tuple[Any, ...]]) -> None:
    _run(ops, check=True, engine=engine_class(name))


@settings(max_examples=60, deadline=None)
@given(st.lists(_op, min_size=1, max_size=60))
def test_same_commands_same_events(ops: list[tuple[Any, ...]]) -> None:
    assert _run(ops, check=False) == _run(ops, check=False)


@settings(max_examples=400, deadline=None)
@given(st.lists(_op, min_size=1, max_size=80))
def test_the_stops_bounds_skip_only_scans_that_would_fire_nothing(ops: list[tuple[Any, ...]]) -> None:
    assert _run(ops, check=False) == _run(ops, check=False, scan_stops=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, min_size=1, max_size=80))
def test_compiled_engine_gives_the_same_events_as_the_pure_one(ops: list[tuple[Any, ...]]) -> None:
    assert _run(ops, check=False, engine=E.Book) == _run(ops, check=False, engine=engine_class("native"))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(1, 30), st.integers(90, 110), st.booleans()), max_size=120
    )
)
def test_matches_the_baseline_on_plain_limit_and_market(orders: list[tuple[int, int, int, bool]]) -> None:
    """On plain limit/market flow, the book equals a tiny reference model (sorted lists)."""
    book = ENGINES.get("native", E.Book)()
    ref: dict[int, list[list[int]]] = {0: [], 1: []}  # side -> [[tick, seq, lots]]
    for i, (side, lots, tick, market) in enumerate(orders):
        if market:
            book.market(i, side, lots)
        else:
            book.limit(i, side, tick, lots)
        _ref_order(ref, i, side, lots, None if market else tick)
        book.take_events()
    for side in (0, 1):
        rows: dict[int, list[int]] = {}
        for tick, _, lots in ref[side]:
            row = rows.setdefault(tick, [tick, 0, 0])
            row[1] += lots
            row[2] += 1
        want = sorted(rows.values(), key=lambda r: -r[0] if side == 0 else r[0])
        assert [list(r) for r in book.levels(side)] == want


@pytest.mark.parametrize("name", ["pure", "native"])
@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 40), st.integers(1, 9), st.booleans()),
        min_size=40,
        max_size=150,
    )
)
def test_levels_open_and_close_anywhere_in_a_deep_book(
    name: str, orders: list[tuple[int, int, int, bool]]
) -> None:
    """Levels opened far behind the best price (past the engine's short scan from the best end of
    its sorted keys) and at it, emptied by cancels and by trades: the sides stay sorted and exact."""
    book = engine_class(name)()
    resting: dict[int, tuple[int, int, int]] = {}  # id -> (side, tick, lots), passive orders only
    for i, (side, depth, lots, take) in enumerate(orders, 1):
        if take and resting:  # cancel one, or trade the best level of the other side away
            victim = sorted(resting)[depth % len(resting)]
            if depth % 2:
                book.cancel(victim)
                del resting[victim]
            else:
                vside = resting[victim][0]
                best = [r for r in resting.values() if r[0] == vside]
                best_tick = max(r[1] for r in best) if vside == E.BUY else min(r[1] for r in best)
                book.limit(i, 1 - vside, best_tick, sum(r[2] for r in best if r[1] == best_tick))
                resting = {k: r for k, r in resting.items() if not (r[0] == vside and r[1] == best_tick)}
        else:
            tick = 100 - depth if side == E.BUY else 101 + depth
            book.limit(i, side, tick, lots)
            resting[i] = (side, tick, lots)
        book.take_events()
        book.check()
    for side in (E.BUY, E.SELL):
        rows: dict[int, list[int]] = {}
        for s_, tick, lots in resting.values():
            if s_ == side:
                row = rows.setdefault(tick, [tick, 0, 0])
                row[1] += lots
                row[2] += 1
        want = sorted(rows.values(), key=lambda r: -r[0] if side == E.BUY else r[0])
        assert [list(r) for r in book.levels(side)] == want


def _ref_order(ref: dict[int, list[list[int]]], seq: int, side: int, lots: int, tick: int | None) -> None:
    opp = ref[1 - side]
    opp.sort(key=lambda r: ((r[0] if side == 0 else -r[0]), r[1]))
    while lots and opp:
        best = opp[0]
        if tick is not None and (best[0] > tick if side == 0 else best[0] < tick):
            break
        f = min(lots, best[2])
        lots -= f
        best[2] -= f
        if not best[2]:
            opp.pop(0)
    if lots and tick is not None:
        ref[side].append([tick, seq, lots])


_cmd = st.tuples(
    st.sampled_from(["limit", "limit", "market", "stop", "cancel", "replace", "notional", "bad"]),
    st.integers(0, 1),
    st.integers(1, 30),
    st.integers(9_980, 10_020),
    st.sampled_from(["gtc", "day", "ioc", "fok"]),
    st.integers(0, 40),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_cmd, min_size=1, max_size=50))
def test_decimal_layer_reports_are_contiguous_and_consistent(cmds: list[tuple[Any, ...]]) -> None:
    """Through OrderBook: seq is 1, 2, ... with no gap; every fill has a maker/taker pair at one price;
    cum + leaves never exceed the order; a rejected command changes nothing."""
    from decimal import Decimal

    from tests.orderbook.helpers import Harness

    h = Harness()
    seq = 0
    for i, (kind, side_i, qty, tick, tif, ref) in enumerate(cmds, start=1):
        side = "buy" if side_i == 0 else "sell"
        price = Decimal(tick) / 100
        before = h.book.snapshot()
        if kind == "limit":
            out = h.new(i, side, qty, price, tif=tif)
        elif kind == "market":
            out = h.new(i, side, qty, tif=tif)
        elif kind == "stop":
            out = h.new(i, side, qty, stop=price)
        elif kind == "cancel":
            out = h.cancel(ref)
        elif kind == "replace":
            out = h.replace(ref, 1000 + i, qty=qty)
        elif kind == "notional":
            out = h.new(i, side, notional=qty * 50)
        else:
            out = h.new(i, side, qty, price + Decimal("0.001"))
        assert [r.seq for r in out] == list(range(seq + 1, seq + 1 + len(out)))
        seq += len(out)
        fills = [r for r in out if r.exec.value == "fill"]
        assert len(fills) % 2 == 0
        for taker, maker in zip(fills[::2], fills[1::2], strict=True):
            assert taker.liquidity is not None and taker.liquidity.value == "taker"
            assert maker.liquidity is not None and maker.liquidity.value == "maker"
            assert taker.price == maker.price and taker.qty == maker.qty and taker.side != maker.side
            assert taker.counter_order_id == maker.order_id
        for r in out:
            if r.cum_qty is not None and r.leaves_qty is not None:
                assert r.cum_qty >= 0 and r.leaves_qty >= 0
        if [r.exec.value for r in out] == ["rejected"]:
            assert h.book.snapshot() == before


@settings(max_examples=200, deadline=None)
@given(
    st.decimals(min_value="0.01", max_value="100000", places=2),
    st.integers(0, 500),
    st.integers(1, 12),
    st.integers(0, 200),
    st.booleans(),
)
def test_liquidity_ladder_is_on_grid_uncrossed_and_distinct(
    ref: Any, spread: int, levels: int, step: int, crypto: bool
) -> None:
    from decimal import Decimal

    from papertrade.book.liquidity import LiquidityConfig, ladder
    from papertrade.enums import Side

    tick, lot = (Decimal("0.01"), Decimal("0.0001")) if crypto else (Decimal("0.01"), Decimal(1))
    cfg = LiquidityConfig(
        spread_bps=Decimal(spread), levels=levels, size=Decimal("1.5"), step_bps=Decimal(step)
    )
    rungs = ladder(Decimal(ref), cfg, tick, lot)
    bids = [r.price for r in rungs if r.side is Side.BUY]
    asks = [r.price for r in rungs if r.side is Side.SELL]
    assert len(asks) == levels
    assert bids == sorted(bids, reverse=True) and len(set(bids)) == len(bids)
    assert asks == sorted(asks) and len(set(asks)) == len(asks)
    assert all(p > 0 and p % tick == 0 for p in bids + asks)
    assert not bids or bids[0] < asks[0]
    assert all(r.qty > 0 and r.qty % lot == 0 for r in rungs)


@pytest.mark.parametrize("name", ["pure", "native"])
@settings(max_examples=120, deadline=None)
@given(cmds=st.lists(_cmd, min_size=2, max_size=50), cut=st.integers(0, 50))
def test_snapshot_restore_continues_identically(name: str, cmds: list[tuple[Any, ...]], cut: int) -> None:
    """dump -> JSON -> restore at any point, then the same commands give the same reports and book."""
    import orjson

    from papertrade.book import OrderBook
    from papertrade.codec import encode
    from tests.orderbook.helpers import Harness

    engine = engine_class(name)
    a = Harness(engine=engine)
    cut = min(cut, len(cmds))
    for i, c in enumerate(cmds[:cut], start=1):
        _drive(a, i, c)
    b = Harness(engine=engine)
    b.book = OrderBook.restore(orjson.loads(encode(a.book.dump())), engine)
    assert b.book.snapshot() == a.book.snapshot()
    for i, c in enumerate(cmds[cut:], start=cut + 1):
        ra, rb = _drive(a, i, c), _drive(b, i, c)
        assert [encode(r) for r in ra] == [encode(r) for r in rb]
    assert b.book.snapshot() == a.book.snapshot()
    assert b.book.core.dump() == a.book.core.dump()


def _drive(h: Any, i: int, c: tuple[Any, ...]) -> list[Any]:
    from decimal import Decimal

    kind, side_i, qty, tick, tif, ref = c
    side = "buy" if side_i == 0 else "sell"
    price = Decimal(tick) / 100
    if kind == "limit":
        return list(h.new(i, side, qty, price, tif=tif))
    if kind == "market":
        return list(h.new(i, side, qty, tif=tif))
    if kind == "stop":
        return list(h.new(i, side, qty, stop=price, tif=tif if tif in ("gtc", "day") else "gtc"))
    if kind == "cancel":
        return list(h.cancel(ref))
    if kind == "replace":
        return list(h.replace(ref, 1000 + i, qty=qty))
    if kind == "notional":
        return list(h.new(i, side, notional=qty * 50))
    from papertrade.book import ExpireDayCmd
    from tests.orderbook.helpers import T0

    return list(h.apply(ExpireDayCmd(symbol="AAPL", t=T0)))
