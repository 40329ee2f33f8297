"""The ledger consumer's batches on real NATS (JetStream) and Postgres, in this process.

A batch is one transaction: accepts and fills of one order together, a whole batch delivered again,
a batch over many accounts (the exact ledger invariant), a poison report dropped without holding the
stream up, and the pull loop's flow from JetStream.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import nats
import psycopg
import pytest
from sqlalchemy import create_engine, insert
from structlog.testing import capture_logs

from papertrade import codec
from papertrade.bus import subjects
from papertrade.bus.streams import ensure_streams, exec_consumer_config
from papertrade.db import migrate
from papertrade.enums import ExecType, LiquiditySide, Side
from papertrade.ledger import CommissionModel, Ledger
from papertrade.messages import ExecReport
from papertrade.stack.infra import Endpoints, create_database, libpq_url
from papertrade_broker import app as broker_app
from papertrade_broker.consumer import LedgerConsumer
from papertrade_broker.settings import BrokerSettings
from papertrade_broker.tables import accounts, orders
from papertrade_broker.views import OrderViews, order_view
from tests.broker.holds import check_holds

D = Decimal
SYMBOL = "LEDG"


@pytest.fixture(scope="module")
def ledger_db(infra: Endpoints) -> str:
    db = create_database(infra.database_url, f"ledger_{uuid.uuid4().hex[:10]}")
    migrate(db, broker_app.MIGRATIONS, broker_app.VERSION_TABLE)
    return db


@pytest.fixture
def settings(infra: Endpoints, ledger_db: str, monkeypatch: pytest.MonkeyPatch) -> BrokerSettings:
    for key, value in {**infra.env(), "DATABASE_URL": ledger_db}.items():
        monkeypatch.setenv(key, value)
    return BrokerSettings()


@pytest.fixture
async def consumer(settings: BrokerSettings) -> AsyncIterator[LedgerConsumer]:
    """A consumer whose durable starts at the end of the stream (other tests' reports are not its)."""
    durable = f"ledger-test-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    await ensure_streams(js)
    info = await js.stream_info(subjects.STREAM_EX_EXEC)
    await js.add_consumer(subjects.STREAM_EX_EXEC, exec_consumer_config(durable, info.state.last_seq + 1))
    await nc.close()
    c = LedgerConsumer(settings, durable)
    c.retry_delay = 0.05
    yield c
    c.stopping.set()
    if c._db is not None:
        await c._db.close()
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    await js.purge_stream(subjects.STREAM_EX_EXEC, subject=subjects.ex_exec(SYMBOL))
    await js.delete_consumer(subjects.STREAM_EX_EXEC, durable)
    await nc.close()


@pytest.fixture
def db(ledger_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_url(ledger_db), autocommit=True) as conn:
        yield conn


def test_order_views_match_order_view(db: psycopg.Connection[Any], ledger_db: str) -> None:
    acct = _accounts(ledger_db, 1)[0]
    oid = _orders(ledger_db, acct, [(Side.BUY, D("10"), D("99.5"))])[0]
    cur = psycopg.ClientCursor(db)
    cur.row_factory = psycopg.rows.dict_row
    row = dict(cur.execute("SELECT * FROM orders WHERE id = %s", (oid,)).fetchone() or {})
    views = OrderViews(size=2)
    assert views.view(row) == order_view(row)
    row |= {"status": "replaced", "filled_qty": D("3"), "filled_notional": D("298.5"), "fees": D("1")}
    row |= {"replaced_by": uuid.uuid4(), "reason": "r", "filled_at": datetime.now(UTC)}
    assert views.view(row) == order_view(row)
    assert list(views.view(row)) == list(order_view(row))
    for _ in range(3):  # evicted and built again
        views.view({**row, "id": uuid.uuid4()})
    assert views.view(row) == order_view(row)


async def test_batch_mixing_accept_and_fills_of_one_order(
    consumer: LedgerConsumer, db: psycopg.Connection[Any], ledger_db: str
) -> None:
    acct = _accounts(ledger_db, 1, commission={"kind": "per_share", "amount": "0.01", "minimum": "1"})[0]
    oid = _orders(ledger_db, acct, [(Side.BUY, D("10"), D("100"))])[0]
    batch = [
        _report(ExecType.ACCEPTED, oid, acct, Side.BUY),
        _fill(oid, acct, Side.BUY, "4", "100", "A1"),
        _fill(oid, acct, Side.BUY, "6", "99", "A2", leaves="0"),
    ]
    applied = await consumer._apply(batch)
    assert [u.event for _, u in applied.updates] == ["new", "partial_fill", "fill"]
    assert applied.updates[-1][1].position_qty == D("10")
    status, filled, notional, fees, reserved = (
        db.execute(
            "SELECT status, filled_qty, filled_notional, fees, reserved FROM orders WHERE id = %s", (oid,)
        ).fetchone()
        or ()
    )
    assert (status, filled, notional, fees, reserved) == ("filled", D("10"), D("994"), D("1"), D("0"))
    cash, acct_fees = db.execute("SELECT cash, fees FROM accounts WHERE id = %s", (acct,)).fetchone() or ()
    assert cash == D("100000") - D("994") - D("1") and acct_fees == D("1")
    execs = db.execute(
        "SELECT exec_id, cum_qty, leaves_qty, fee FROM executions WHERE order_id = %s ORDER BY seq", (oid,)
    ).fetchall()
    assert execs == [("A1", D("4"), D("6"), D("1")), ("A2", D("10"), D("0"), D("0"))]
    _check_invariant(db, acct)


async def test_fill_naming_another_account_books_the_orders_own(
    consumer: LedgerConsumer, db: psycopg.Connection[Any], ledger_db: str
) -> None:
    """The order's account is the one booked (its commission, cash and position), whatever the report says."""
    acct = _accounts(ledger_db, 1, commission={"kind": "flat", "amount": "2"})[0]
    oid = _orders(ledger_db, acct, [(Side.SELL, D("3"), D("10"))])[0]
    await consumer._apply([_fill(oid, uuid.uuid4(), Side.SELL, "3", "10", "W1", leaves="0")])
    cash, fees = db.execute("SELECT cash, fees FROM accounts WHERE id = %s", (acct,)).fetchone() or ()
    assert (cash, fees) == (D("100000") + D("30") - D("2"), D("2"))
    _check_invariant(db, acct)


async def test_redelivered_batch_changes_nothing(
    consumer: LedgerConsumer, db: psycopg.Connection[Any], ledger_db: str
) -> None:
    acct = _accounts(ledger_db, 1)[0]
    buy, sell, rest = _orders(
        ledger_db,
        acct,
        [(Side.BUY, D("5"), D("10")), (Side.SELL, D("2"), D("12")), (Side.BUY, D("1"), D("9"))],
    )
    batch = [
        _report(ExecType.ACCEPTED, buy, acct, Side.BUY),
        _report(ExecType.ACCEPTED, sell, acct, Side.SELL),
        _report(ExecType.ACCEPTED, rest, acct, Side.BUY),
        _fill(buy, acct, Side.BUY, "5", "10", "R1", leaves="0"),
        _fill(sell, acct, Side.SELL, "1", "12", "R2"),
        _fill(sell, acct, Side.SELL, "1", "12", "R2"),  # the same execution twice in one batch
        _report(ExecType.CANCELED, rest, acct, Side.BUY),
    ]
    first = await consumer._apply(batch)
    assert [u.event for _, u in first.updates] == ["new", "new", "new", "fill", "partial_fill", "canceled"]
    before = _snapshot(db, acct)
    again = await consumer._apply(batch)
    assert again.updates == [] and again.new_execs == []
    assert _snapshot(db, acct) == before
    assert before["positions"] == [(SYMBOL, D("4"), D("40"), D("2"))]
    _check_invariant(db, acct)


async def test_batch_spanning_many_accounts(
    consumer: LedgerConsumer, db: psycopg.Connection[Any], ledger_db: str
) -> None:
    """One batch over 40 accounts (some with commissions), random fills: Postgres matches the pure
    ledger of each account to the cent, and each position's quantity is the sum of its fills."""
    rng = random.Random(5)
    commission = {"kind": "per_share", "amount": "0.005", "minimum": "0.35"}
    accts = _accounts(ledger_db, 20) + _accounts(ledger_db, 20, commission=commission)
    ledgers = {a: Ledger(cash=D("100000"), commission=CommissionModel.parse(None)) for a in accts[:20]}
    ledgers |= {a: Ledger(cash=D("100000"), commission=CommissionModel.parse(commission)) for a in accts[20:]}
    book: list[tuple[UUID, UUID, Side]] = []
    for a in accts:
        ids = _orders(ledger_db, a, [(Side.BUY, D("1000"), D("500")), (Side.SELL, D("1000"), D("1"))])
        book += [(ids[0], a, Side.BUY), (ids[1], a, Side.SELL)]
    reports = [_report(ExecType.ACCEPTED, o, a, s) for o, a, s in book]
    for n in range(600):
        oid, a, side = rng.choice(book)
        qty, price = D(rng.randint(1, 9)), D(rng.randint(100, 50000)) / 100
        reports.append(_fill(oid, a, side, str(qty), str(price), f"M{n}"))
        ledgers[a].fill(SYMBOL, side, qty, price, order_id=str(oid))
    applied = await consumer._apply(reports)
    assert len(applied.new_execs) == 600
    for a, ledger in ledgers.items():
        _check_invariant(db, a)
        cash, fees, realized = (
            db.execute("SELECT cash, fees, realized_pl FROM accounts WHERE id = %s", (a,)).fetchone() or ()
        )
        assert (cash, fees, realized) == (ledger.cash, ledger.fees, ledger.realized_pl)
        pos = db.execute(
            "SELECT qty, cost, realized_pl FROM positions WHERE account_id = %s AND symbol = %s", (a, SYMBOL)
        ).fetchone()
        want = ledger.position(SYMBOL)
        assert pos == (want.qty, want.cost, want.realized_pl) or (pos is None and want.qty == 0)


async def test_order_holds_follow_every_report_kind(
    consumer: LedgerConsumer, db: psycopg.Connection[Any], ledger_db: str
) -> None:
    """What open orders hold (`order_holds`, kept by triggers) stays their sum through random batches of
    accepts, partial and whole fills, cancels, expiries, rejects, replaces and refused replaces, with
    orders by quantity and by notional, and reports about orders already final."""
    rng = random.Random(17)
    accts = _accounts(ledger_db, 3)
    known: list[tuple[UUID, UUID, Side]] = []
    now = datetime.now(UTC)
    for round_ in range(10):
        reports: list[ExecReport] = []
        for a in accts:
            specs = [
                (rng.choice([Side.BUY, Side.SELL]), D(rng.randint(1, 20)), D(rng.randint(50, 150)))
                for _ in range(4)
            ]
            for oid, (side, _, _) in zip(_orders(ledger_db, a, specs), specs, strict=True):
                known.append((oid, a, side))
                reports.append(_report(ExecType.ACCEPTED, oid, a, side))
            (by_notional,) = _orders(
                ledger_db,
                a,
                [(Side.BUY, D(0), D(0))],
                qty=None,
                notional=D("500"),
                reserved=D("500"),
                type="market",
                time_in_force="day",
            )
            known.append((by_notional, a, Side.BUY))
        for n in range(40):
            oid, a, side = rng.choice(known)
            kind = rng.choice(["fill", "fill", "fill", "cancel", "expire", "reject", "replace", "unreplace"])
            if kind == "fill":
                qty = D(rng.randint(1, 6))
                reports.append(
                    _fill(
                        oid,
                        a,
                        side,
                        str(qty),
                        str(rng.randint(60, 140)),
                        f"H{round_}-{n}",
                        leaves=None if rng.random() < 0.8 else "0",
                    )
                )
            elif kind in ("cancel", "expire"):
                reports.append(
                    _report(
                        ExecType.CANCELED if kind == "cancel" else ExecType.EXPIRED, oid, a, side, reason=kind
                    )
                )
            elif kind == "reject":
                reports.append(_report(ExecType.REJECTED, oid, a, side, reason="refused", command="new"))
            else:
                (new,) = _orders(
                    ledger_db, a, [(side, D(rng.randint(5, 25)), D(100))], replaces=oid, created_at=now
                )
                db.execute("UPDATE orders SET replaced_by = %s WHERE id = %s", (new, oid))
                known.append((new, a, side))
                if kind == "replace":
                    reports.append(_report(ExecType.REPLACED, oid, a, side, new_order_id=new))
                else:
                    reports.append(
                        _report(ExecType.REJECTED, oid, a, side, reason="too late", command="replace")
                    )
        await consumer._apply(reports)
        for a in accts:
            _check_invariant(db, a)
    statuses = {
        r[0] for r in db.execute("SELECT DISTINCT status FROM orders WHERE account_id = ANY(%s)", (accts,))
    }
    assert {"new", "partially_filled", "filled", "canceled", "expired", "rejected", "replaced"} <= statuses


async def test_stream_with_poison_and_redelivery(
    consumer: LedgerConsumer, db: psycopg.Connection[Any], ledger_db: str, settings: BrokerSettings
) -> None:
    """Through JetStream: unreadable bytes and a report that fails on its own are logged and dropped;
    the reports behind them are booked; the same reports published again change nothing."""
    acct = _accounts(ledger_db, 1)[0]
    oids = _orders(ledger_db, acct, [(Side.BUY, D("3"), D("50"))] * 40)
    good = [_report(ExecType.ACCEPTED, o, acct, Side.BUY) for o in oids]
    good += [_fill(o, acct, Side.BUY, "3", "50", f"S{i}", leaves="0") for i, o in enumerate(oids)]
    poison = codec.encode(_fill(oids[0], acct, Side.BUY, "1", "50", "P1")).replace(
        b'"qty":"1"', b'"qty":"NaN"'
    )
    nc = await nats.connect(settings.nats_url)
    subject = subjects.ex_exec(SYMBOL)
    events: list[bytes] = []

    async def on_event(msg: Any) -> None:
        events.append(msg.data)

    await nc.subscribe(subjects.broker_event(acct), cb=on_event)
    with capture_logs() as logs:
        task = asyncio.create_task(consumer.run())
        await nc.publish(subject, b"{not json")
        await nc.publish(subject, poison)
        for r in good:
            await nc.publish(subject, codec.encode(r))
        await nc.flush()
        await _until(lambda: _count(db, acct) == 40 and len(events) == 80)
        await _until(
            lambda: any(e.get("event") == "execution report dropped after repeated failures" for e in logs)
        )
        before = _snapshot(db, acct)
        applied = consumer.applied
        for r in good:  # everything again (new JetStream messages): nothing changes
            await nc.publish(subject, codec.encode(r))
        await nc.flush()
        await _until(lambda: consumer.applied >= applied + len(good))
        consumer.stopping.set()
        await asyncio.wait_for(task, 10)
    await nc.close()
    assert any(e.get("event") == "unreadable execution report skipped" for e in logs)
    # neither is gone: both are kept as received, with why
    letters = db.execute(
        "select data, reason, subject from ledger_dead_letters order by stream_seq"
    ).fetchall()
    assert [bytes(d) for d, _, _ in letters] == [b"{not json", poison], letters
    assert letters[0][1].startswith("unreadable") and letters[1][1].startswith("failed 5 times")
    assert {subj for _, _, subj in letters} == {subject}
    assert _snapshot(db, acct) == before and len(events) == 80
    _check_invariant(db, acct)
    assert db.execute("SELECT count(*) FROM executions WHERE exec_id = 'P1'").fetchone() == (0,)


async def _until(check: Any, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


def _count(db: psycopg.Connection[Any], acct: UUID) -> int:
    row = db.execute("SELECT count(*) FROM executions WHERE account_id = %s", (acct,)).fetchone()
    return int(row[0]) if row else 0


def _accounts(database_url: str, n: int, commission: dict[str, Any] | None = None) -> list[UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    now = datetime.now(UTC)
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            insert(accounts),
            [
                {
                    "id": a,
                    "name": "t",
                    "account_number": f"PT{a.hex[:12].upper()}",
                    "cash": D("100000"),
                    "starting_cash": D("100000"),
                    "commission": commission,
                    "created_at": now,
                }
                for a in ids
            ],
        )
    engine.dispose()
    return ids


def _orders(
    database_url: str, acct: UUID, specs: list[tuple[Side, Decimal, Decimal]], **extra: Any
) -> list[UUID]:
    """Open limit orders of `acct` (`extra`: more columns of each row)."""
    now = datetime.now(UTC)
    rows = [
        {
            "id": uuid.uuid4(),
            "account_id": acct,
            "client_order_id": uuid.uuid4().hex,
            "symbol": SYMBOL,
            "side": side.value,
            "type": "limit",
            "time_in_force": "gtc",
            "qty": qty,
            "limit_price": price,
            "status": "pending_new",
            "reserve_price": price if side is Side.BUY else D(0),
            "reserved": qty * price if side is Side.BUY else D(0),
            "created_at": now,
            "updated_at": now,
            "submitted_at": now,
            **extra,
        }
        for side, qty, price in specs
    ]
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(insert(orders), rows)
    engine.dispose()
    return [r["id"] for r in rows]


def _report(kind: ExecType, oid: UUID, acct: UUID, side: Side, **extra: Any) -> ExecReport:
    return ExecReport(
        exec=kind,
        seq=1,
        order_id=oid,
        account_id=acct,
        symbol=SYMBOL,
        side=side,
        t=datetime.now(UTC),
        **extra,
    )


def _fill(
    oid: UUID, acct: UUID, side: Side, qty: str, price: str, exec_id: str, leaves: str | None = None
) -> ExecReport:
    return _report(
        ExecType.FILL,
        oid,
        acct,
        side,
        exec_id=exec_id,
        qty=D(qty),
        price=D(price),
        leaves_qty=D(leaves) if leaves is not None else None,
        liquidity=LiquiditySide.MAKER,
    )


def _snapshot(db: psycopg.Connection[Any], acct: UUID) -> dict[str, Any]:
    return {
        "account": db.execute(
            "SELECT cash, fees, realized_pl FROM accounts WHERE id = %s", (acct,)
        ).fetchall(),
        "orders": db.execute(
            "SELECT id, status, filled_qty, filled_notional, fees, reserved, updated_at FROM orders"
            " WHERE account_id = %s ORDER BY id",
            (acct,),
        ).fetchall(),
        "positions": db.execute(
            "SELECT symbol, qty, cost, realized_pl FROM positions WHERE account_id = %s", (acct,)
        ).fetchall(),
        "executions": db.execute(
            "SELECT exec_id, order_id, qty, price, fee FROM executions WHERE account_id = %s ORDER BY seq",
            (acct,),
        ).fetchall(),
    }


def _check_invariant(db: psycopg.Connection[Any], acct: UUID) -> None:
    """cash + sum(position cost) = starting cash - fees + realised P&L, exactly; qty = sum of fills;
    what `order_holds` says the open orders hold is what they hold."""
    check_holds(db, acct)
    cash, start, fees, realized = (
        db.execute(
            "SELECT cash, starting_cash, fees, realized_pl FROM accounts WHERE id = %s", (acct,)
        ).fetchone()
        or ()
    )
    cost = db.execute(
        "SELECT coalesce(sum(cost), 0) FROM positions WHERE account_id = %s", (acct,)
    ).fetchone()
    assert cost is not None and cash + cost[0] == start - fees + realized
    fee_sum = db.execute(
        "SELECT coalesce(sum(fee), 0) FROM executions WHERE account_id = %s", (acct,)
    ).fetchone()
    assert fee_sum == (fees,)
    for symbol, qty in db.execute("SELECT symbol, qty FROM positions WHERE account_id = %s", (acct,)):
        filled = db.execute(
            "SELECT sum(CASE WHEN side = 'buy' THEN qty ELSE -qty END) FROM executions"
            " WHERE account_id = %s AND symbol = %s",
            (acct, symbol),
        ).fetchone()
        assert filled == (qty,)
