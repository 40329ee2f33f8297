"""The group commit on its own, on the broker's real schema: every submit of a batch gets its own
answer whatever the others do (risk refuses one, Postgres refuses another's value), and an order
refused after risk approved it is released."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import pq

from papertrade.timeutil import utcnow
from papertrade_broker import hotpath
from tests.broker.conftest import Broker


class Refused(Exception):
    pass


def _order(account_id: UUID, coid: str, qty: str = "1") -> hotpath.NewOrder[Any, Any]:
    now = utcnow()
    order_id = uuid.uuid4()
    values = {
        "id": order_id,
        "account_id": account_id,
        "client_order_id": coid,
        "symbol": "AAPL",
        "side": "buy",
        "type": "market",
        "time_in_force": "day",
        "qty": Decimal(qty),
        "notional": None,
        "limit_price": None,
        "stop_price": None,
        "all_or_none": False,
        "extended_hours": False,
        "status": "pending_new",
        "reserve_price": Decimal("100"),
        "reserved": Decimal(0),
        "created_at": now,
        "updated_at": now,
        "submitted_at": now,
    }
    return hotpath.NewOrder(None, None, values, now)


async def test_each_submit_of_a_batch_gets_its_own_answer(broker: Broker) -> None:
    account = UUID(broker.new_account()["id"])
    released: list[tuple[str, str]] = []
    routed: list[str] = []
    writer, pool = await _writer(broker, released, routed)
    try:
        items = [_order(account, "risky"), _order(account, "nul\x00"), _order(account, "good")]
        answers = await asyncio.wait_for(
            asyncio.gather(*(writer.submit(i) for i in items), return_exceptions=True), 30
        )
    finally:
        await writer.stop()
        await pool.close()
    risky, nul, good = answers
    assert isinstance(risky, Refused)
    assert isinstance(nul, psycopg.DataError)
    assert isinstance(good, Mapping) and good["client_order_id"] == "good" and good["filled_qty"] == 0
    assert routed == ["good"]
    assert [coid for coid, _ in released] == ["nul\x00"]  # approved by risk, then refused: handed back
    assert _coids(broker, account) == ["good"]


async def test_a_client_order_id_twice_in_a_batch_is_answered_after_the_first_commits(broker: Broker) -> None:
    """The repeat is answered None (the caller then reads the first order): only once that order is
    committed, or the caller would find nothing."""
    account = UUID(broker.new_account()["id"])
    released: list[tuple[str, str]] = []
    routed: list[str] = []
    seen_at_answer: list[list[str]] = []
    writer, pool = await _writer(broker, released, routed)
    try:
        first, repeat = _order(account, "twice"), _order(account, "twice")
        repeat.done.add_done_callback(lambda _: seen_at_answer.append(_coids(broker, account)))
        answers = await asyncio.wait_for(asyncio.gather(writer.submit(first), writer.submit(repeat)), 30)
    finally:
        await writer.stop()
        await pool.close()
    assert answers[0] is not None and answers[0]["id"] == first.values["id"]
    assert answers[1] is None
    assert seen_at_answer == [["twice"]]
    assert released == [("twice", "duplicate client_order_id")]


async def test_a_batch_is_two_round_trips_and_a_failed_one_leaves_no_transaction_open(
    broker: Broker, tmp_path: Path
) -> None:
    """Round trip 1 (BEGIN, locks, read) and round trip 2 (INSERT, COMMIT) are all a batch costs
    Postgres (psycopg's transaction() in a pipeline made five); after a batch that Postgres refuses,
    the connection goes back to the pool idle, its locks released."""
    account = UUID(broker.new_account()["id"])
    writer, pool = await _writer(broker, [], [])
    trace = tmp_path / "libpq.trace"
    try:
        await asyncio.wait_for(writer.submit(_order(account, "warm")), 30)  # statements prepared
        async with pool.connection() as conn:  # the pool's only idle connection now: the writer's
            pgconn = conn.pgconn
        fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        pgconn.trace(fd)
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            answer = await asyncio.wait_for(writer.submit(_order(account, "traced")), 30)
        finally:
            pgconn.untrace()
            os.close(fd)
        assert isinstance(answer, Mapping)
        directions = [line.split("\t", 1)[0] for line in trace.read_text().splitlines() if line]
        flights = [d for i, d in enumerate(directions) if i == 0 or d != directions[i - 1]]
        assert flights == ["F", "B", "F", "B"], flights
        with pytest.raises(psycopg.DataError):
            await asyncio.wait_for(writer.submit(_order(account, "nul\x00")), 30)
        async with pool.connection() as conn:
            assert conn.info.transaction_status is pq.TransactionStatus.IDLE
    finally:
        await writer.stop()
        await pool.close()
    assert _coids(broker, account) == ["warm", "traced"]


async def test_short_prices_are_read_beside_round_trip_1_once_the_account_is_known_short(
    broker: Broker,
) -> None:
    """A short position counts at market value. The first batch of a short account reads its price
    after round trip 1 (that is when the short is seen); the next batches read it while round trip 1
    and risk are under way. A short closed since then is noticed: a read it no longer needs (even a
    failed one) does not hold the batch up, and the account is no longer read for."""
    account = UUID(broker.new_account()["id"])
    _set_position(broker, account, "AAPL", "-5")
    events: list[str] = []
    seen: list[Mapping[str, Decimal]] = []
    failing = False

    async def screen(batch: Sequence[hotpath.NewOrder[Any, Any]]) -> list[BaseException | None]:
        events.append("risk asked")
        await asyncio.sleep(0.05)
        events.append("risk answered")
        return [None for _ in batch]

    async def check(*args: Any) -> Decimal:
        seen.append(dict(args[7]))
        return Decimal(0)

    async def prices(symbols: Sequence[str]) -> dict[str, Decimal]:
        events.append(f"prices {','.join(symbols)}")
        if failing:
            raise ConnectionError("redis is down")
        return {s: Decimal("42") for s in symbols}

    async def route(item: hotpath.NewOrder[Any, Any], row: Mapping[str, Any]) -> None:
        return None

    pool = hotpath.new_pool(broker.database_url, 1)
    await pool.open()
    writer = hotpath.GroupCommit(
        pool, screen=screen, check=check, prices=prices, release=lambda *_: None, route=route
    )
    writer.start()
    try:
        await asyncio.wait_for(writer.submit(_order(account, "first")), 30)
        assert events == ["risk asked", "risk answered", "prices AAPL"]
        events.clear()
        await asyncio.wait_for(writer.submit(_order(account, "second")), 30)
        assert events == ["risk asked", "prices AAPL", "risk answered"]
        assert seen == [{"AAPL": Decimal("42")}] * 2
        _set_position(broker, account, "AAPL", "0")
        events.clear()
        failing = True
        answer = await asyncio.wait_for(writer.submit(_order(account, "closed")), 30)
        assert isinstance(answer, Mapping) and answer["client_order_id"] == "closed"
        events.clear()
        await asyncio.wait_for(writer.submit(_order(account, "long only")), 30)
        assert events == ["risk asked", "risk answered"]
        assert seen[2:] == [{}, {}]
    finally:
        await writer.stop()
        await pool.close()


async def test_answers_and_commands_are_prepared_before_the_commit_while_risk_is_awaited(
    broker: Broker,
) -> None:
    """`prepare` builds each order's answer and command before round trip 2: while risk's answer is
    awaited (round trip 1 done, the transaction open) when risk is the slower, again for an order risk
    clips; a `prepare` that fails leaves the order booked with nothing prepared; an order the INSERT
    finds taken is answered None whatever was prepared."""
    account = UUID(broker.new_account()["id"])
    seen: list[tuple[str, Any, pq.TransactionStatus, bool]] = []
    routed: list[bytes | None] = []
    pgconn: Any = None
    risk_answered = False

    def prepare(item: hotpath.NewOrder[Any, Any], row: Mapping[str, Any]) -> None:
        coid = row["client_order_id"]
        if coid == "broken":
            item.view = {"half": "built"}
            raise RuntimeError("cannot prepare")
        if pgconn is not None:
            seen.append((coid, row["qty"], pq.TransactionStatus(pgconn.transaction_status), risk_answered))
        item.view = {"coid": coid, "qty": row["qty"], "status": row["status"]}
        item.command = f"cmd {coid} {row['qty']}".encode()

    async def route(item: hotpath.NewOrder[Any, Any], row: Mapping[str, Any]) -> None:
        routed.append(item.command)

    async def screen(batch: Sequence[hotpath.NewOrder[Any, Any]]) -> list[BaseException | None]:
        nonlocal risk_answered
        await asyncio.sleep(0.05)  # after round trip 1
        for b in batch:
            if b.values["client_order_id"] == "clipped":  # what the desk's _apply_spec does
                b.spec = {"clipped": True}
                b.values["qty"] = Decimal("2")
        risk_answered = True
        return [None for _ in batch]

    async def check(*_: Any) -> Decimal:
        return Decimal(0)

    async def prices(_: Sequence[str]) -> dict[str, Decimal]:
        return {}

    pool = hotpath.new_pool(broker.database_url, 1)
    await pool.open()
    writer = hotpath.GroupCommit(
        pool, screen=screen, check=check, prices=prices, release=lambda *_: None, route=route, prepare=prepare
    )
    writer.start()
    try:
        await asyncio.wait_for(writer.submit(_order(account, "warm")), 30)
        async with pool.connection() as conn:  # the pool's only connection: the writer's
            pgconn = conn.pgconn
        risk_answered = False
        with psycopg.connect(hotpath.libpq_url(broker.database_url)) as c:  # a concurrent submit won
            c.execute(
                "insert into orders (id, account_id, client_order_id, symbol, side, type, time_in_force,"
                " qty, status, created_at, updated_at, submitted_at) values"
                " (%s, %s, 'taken', 'AAPL', 'buy', 'market', 'day', 1, 'new', now(), now(), now())",
                (uuid.uuid4(), account),
            )
        items = [_order(account, c, "5") for c in ("a", "broken", "taken", "clipped")]
        answers = await asyncio.wait_for(asyncio.gather(*(writer.submit(i) for i in items)), 30)
    finally:
        await writer.stop()
        await pool.close()
    intrans = pq.TransactionStatus.INTRANS
    assert seen == [
        ("a", Decimal("5"), intrans, False),
        ("taken", Decimal("5"), intrans, False),
        ("clipped", Decimal("5"), intrans, False),
        ("clipped", Decimal("2"), intrans, True),  # risk clipped it: prepared again
    ]
    a, broken, _, clipped = items
    assert a.view == {"coid": "a", "qty": Decimal("5"), "status": "pending_new"} and a.command == b"cmd a 5"
    assert broken.view is None and broken.command is None
    assert clipped.view == {"coid": "clipped", "qty": Decimal("2"), "status": "pending_new"}
    assert [answer is None for answer in answers] == [False, False, True, False]
    assert routed == [b"cmd warm 1", b"cmd a 5", None, b"cmd clipped 2"]
    assert sorted(_coids(broker, account)) == ["a", "broken", "clipped", "taken", "warm"]


async def _writer(
    broker: Broker, released: list[tuple[str, str]], routed: list[str]
) -> tuple[hotpath.GroupCommit, Any]:
    """A group commit on the broker's database: risk refuses client_order_id `risky` (after round trip
    1 has begun), buying power passes, releases and routes are recorded."""

    async def screen(batch: Sequence[hotpath.NewOrder[Any, Any]]) -> list[BaseException | None]:
        await asyncio.sleep(0.05)  # risk answers after round trip 1
        return [Refused("risk: no") if b.values["client_order_id"] == "risky" else None for b in batch]

    async def check(*_: Any) -> Decimal:
        return Decimal(0)

    async def prices(_: Sequence[str]) -> dict[str, Decimal]:
        return {}

    def release(item: hotpath.NewOrder[Any, Any], reason: str) -> None:
        released.append((item.values["client_order_id"], reason))

    async def route(item: hotpath.NewOrder[Any, Any], row: Mapping[str, Any]) -> None:
        routed.append(row["client_order_id"])

    pool = hotpath.new_pool(broker.database_url, 1)
    await pool.open()
    writer = hotpath.GroupCommit(
        pool, screen=screen, check=check, prices=prices, release=release, route=route
    )
    writer.start()
    return writer, pool


def _coids(broker: Broker, account: UUID) -> list[str]:
    with psycopg.connect(hotpath.libpq_url(broker.database_url)) as conn:
        rows = conn.execute("select client_order_id from orders where account_id = %s", (account,)).fetchall()
    return [r[0] for r in rows]


def _set_position(broker: Broker, account: UUID, symbol: str, qty: str) -> None:
    with psycopg.connect(hotpath.libpq_url(broker.database_url)) as conn:
        conn.execute(
            "insert into positions (account_id, symbol, qty, cost, realized_pl, updated_at) "
            "values (%s, %s, %s, %s, 0, now()) on conflict (account_id, symbol) "
            "do update set qty = excluded.qty, cost = excluded.cost",
            (account, symbol, Decimal(qty), Decimal(qty) * 100),
        )
