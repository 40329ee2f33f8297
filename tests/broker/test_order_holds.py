"""`order_holds`: what open orders hold per account, symbol and side, kept by triggers on `orders`.

Every writer of `orders` keeps it right without knowing it exists: the group commit's inserts, the
ledger's updates, the desk's replaces and rejections, a hand-written fix in psql. Checked here on a
real Postgres: each status counts or not, transitions, concurrent writers, an account's deletion,
and the migration that fills it from the orders already open.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
import pytest

from papertrade.db import migrate
from papertrade.enums import OrderStatus
from papertrade.stack.infra import libpq_url
from papertrade_broker.app import MIGRATIONS, VERSION_TABLE
from tests.broker.holds import check_holds

D = Decimal


@pytest.fixture
def db(fresh_database_url: str) -> psycopg.Connection[Any]:
    migrate(fresh_database_url, MIGRATIONS, VERSION_TABLE)
    return psycopg.connect(libpq_url(fresh_database_url), autocommit=True)


@pytest.mark.parametrize("status", list(OrderStatus))
def test_an_order_holds_while_its_status_is_open(db: psycopg.Connection[Any], status: OrderStatus) -> None:
    acct = _account(db)
    _order(db, acct, status=status.value, qty=D(10), reserved=D(1000))
    _order(db, acct, status=status.value, qty=None, notional=D(500), reserved=D(500))
    held = _held(db, acct)
    assert held == ({("AAPL", "buy"): (D(1500), D(10))} if status.is_open else {})
    check_holds(db, acct)


def test_transitions_fills_and_deletion(db: psycopg.Connection[Any]) -> None:
    acct = _account(db)
    a = _order(db, acct, qty=D(10), reserved=D(1000))
    b = _order(db, acct, qty=D(4), reserved=D(400))
    c = _order(db, acct, qty=D(7), reserved=D(0), side="sell", symbol="MSFT")
    assert _held(db, acct) == {("AAPL", "buy"): (D(1400), D(14)), ("MSFT", "sell"): (D(0), D(7))}
    db.execute(
        "UPDATE orders SET status = 'partially_filled', filled_qty = 3, reserved = 700 WHERE id = %s", (a,)
    )
    db.execute("UPDATE orders SET status = 'pending_cancel' WHERE id = %s", (b,))  # holds on
    assert _held(db, acct)[("AAPL", "buy")] == (D(1100), D(11))
    db.execute("UPDATE orders SET status = 'canceled', reserved = 0 WHERE id = ANY(%s)", ([b, c],))
    assert _held(db, acct) == {("AAPL", "buy"): (D(700), D(7))}
    # A fix by hand (a status back to open) counts again: the triggers do not trust the writer.
    db.execute("UPDATE orders SET status = 'new', reserved = 400 WHERE id = %s", (b,))
    assert _held(db, acct)[("AAPL", "buy")] == (D(1100), D(11))
    db.execute("DELETE FROM orders WHERE id = %s", (a,))
    assert _held(db, acct)[("AAPL", "buy")] == (D(400), D(4))
    check_holds(db, acct)
    db.execute("DELETE FROM accounts WHERE id = %s", (acct,))  # its orders and holdings go with it
    assert _held(db, acct) == {}


def test_concurrent_writers_of_one_account_sum_exactly(db: psycopg.Connection[Any]) -> None:
    """Four connections insert and fill orders of one account and symbol at once: no update lost."""
    acct = _account(db)
    url = db.info.dsn
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                for i in range(40):
                    oid = _order(conn, acct, qty=D(n + 1), reserved=D("10.01") * (n + 1))
                    if i % 3 == 0:
                        conn.execute(
                            "UPDATE orders SET status = 'filled', filled_qty = qty, reserved = 0 WHERE id = %s",
                            (oid,),
                        )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check_holds(db, acct)
    assert _held(db, acct)[("AAPL", "buy")] == (D("10.01") * 26 * 10, D(26 * 10))


def test_the_migration_fills_holdings_from_the_orders_already_open(fresh_database_url: str) -> None:
    migrate(fresh_database_url, MIGRATIONS, VERSION_TABLE, revision="0002_ledger_dead_letters")
    with psycopg.connect(libpq_url(fresh_database_url), autocommit=True) as db:
        acct = _account(db)
        _order(db, acct, qty=D(10), reserved=D(1000))
        _order(db, acct, qty=D(5), reserved=D(0), side="sell")
        _order(db, acct, qty=D(3), reserved=D(300), status="filled")
        migrate(fresh_database_url, MIGRATIONS, VERSION_TABLE)
        assert _held(db, acct) == {("AAPL", "buy"): (D(1000), D(10)), ("AAPL", "sell"): (D(0), D(5))}
        _order(db, acct, qty=D(1), reserved=D(100))
        check_holds(db, acct)


def _account(db: psycopg.Connection[Any]) -> UUID:
    acct = uuid.uuid4()
    db.execute(
        "INSERT INTO accounts (id, name, account_number, cash, starting_cash, created_at)"
        " VALUES (%s, 't', %s, 100000, 100000, now())",
        (acct, f"PT{acct.hex[:12].upper()}"),
    )
    return acct


def _order(
    db: psycopg.Connection[Any],
    acct: UUID,
    *,
    qty: Decimal | None,
    reserved: Decimal,
    status: str = "new",
    side: str = "buy",
    symbol: str = "AAPL",
    notional: Decimal | None = None,
) -> UUID:
    oid = uuid.uuid4()
    now = datetime.now(UTC)
    db.execute(
        "INSERT INTO orders (id, account_id, client_order_id, symbol, side, type, time_in_force, qty, notional,"
        " status, reserve_price, reserved, created_at, updated_at, submitted_at)"
        " VALUES (%s, %s, %s, %s, %s, 'limit', 'gtc', %s, %s, %s, 100, %s, %s, %s, %s)",
        (oid, acct, oid.hex, symbol, side, qty, notional, status, reserved, now, now, now),
    )
    return oid


def _held(db: psycopg.Connection[Any], acct: UUID) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
    return {
        (r[0], r[1]): (r[2], r[3])
        for r in db.execute(
            "SELECT symbol, side, reserved, open_qty FROM order_holds WHERE account_id = %s"
            " AND (reserved <> 0 OR open_qty <> 0)",
            (acct,),
        )
    }
