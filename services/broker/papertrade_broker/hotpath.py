"""The submit hot path in plain psycopg 3: a pool of raw connections, prepared statements, group commit.

SQLAlchemy (Core, async) stays the schema's and Alembic's, and serves the rarer routes. New orders
are written by `GroupCommit`: the submits that arrive while a transaction is in flight wait for the
next one, and one transaction books them all in two round trips (pipeline mode: BEGIN, lock their
accounts, read what open orders hold and the positions that matter; then the INSERTs and COMMIT).
Each submit is answered after the commit that holds its order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Generic, TypeVar
from uuid import UUID

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import make_url

from papertrade.enums import OrderStatus
from papertrade.money import ZERO

OPEN_STATUSES = [s.value for s in OrderStatus if s.is_open]
#: The open statuses inlined (not a parameter), so that the partial index `ix_orders_open` serves.
_OPEN_SQL = "(" + ", ".join(f"'{s}'" for s in sorted(OPEN_STATUSES)) + ")"
_log = structlog.get_logger("papertrade_broker.hotpath")

_COLUMNS = (
    "id",
    "account_id",
    "client_order_id",
    "symbol",
    "side",
    "type",
    "time_in_force",
    "qty",
    "notional",
    "limit_price",
    "stop_price",
    "all_or_none",
    "extended_hours",
    "status",
    "reserve_price",
    "reserved",
    "created_at",
    "updated_at",
    "submitted_at",
)
INSERT_ORDER = f"INSERT INTO orders ({', '.join(_COLUMNS)}) VALUES ({', '.join(f'%({c})s' for c in _COLUMNS)}) RETURNING *"
#: The same, a taken client_order_id answering no row instead of failing the transaction.
INSERT_ORDER_NEW = INSERT_ORDER.replace(" RETURNING *", " ON CONFLICT DO NOTHING RETURNING *")

#: One batch: lock its accounts (in id order: no deadlock between batches), then, in the same
#: pipeline and so after the locks are held, what their open orders hold and the positions that matter.
LOCK_ACCOUNTS = "SELECT id, cash FROM accounts WHERE id = ANY(%(a)s) ORDER BY id FOR UPDATE"
OPEN_RESERVED = f"""
SELECT account_id, sum(reserved) AS reserved FROM orders
WHERE account_id = ANY(%(a)s) AND status IN {_OPEN_SQL} GROUP BY account_id
"""
OPEN_SAME_SIDE = f"""
SELECT account_id, symbol, side, sum(qty - filled_qty) AS open_qty FROM orders
WHERE account_id = ANY(%(a)s) AND status IN {_OPEN_SQL} AND symbol = ANY(%(s)s) AND qty IS NOT NULL
GROUP BY account_id, symbol, side
"""
HELD = """
SELECT account_id, symbol, qty::text AS qty FROM positions
WHERE account_id = ANY(%(a)s) AND (symbol = ANY(%(s)s) OR qty < 0)
"""
#: The most new orders one transaction books.
MAX_BATCH = 256

_A = TypeVar("_A")
_S = TypeVar("_S")


@dataclass
class NewOrder(Generic[_A, _S]):
    """One submit waiting for its transaction: `values` are the `orders` row (reserved filled in)."""

    account: _A
    spec: _S
    account_id: UUID
    symbol: str
    side: str
    qty: Decimal | None
    values: dict[str, Any]
    done: asyncio.Future[Mapping[str, Any] | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


#: `check(account, spec, reference price, cash, reserved, open same side, held, prices)` -> the buying
#: power the order reserves, or raises (an ApiError) to refuse it; `held` is [[symbol, qty text], ...]:
#: the account's position in the order's symbol and its shorts; `prices` the latest prices of the
#: batch's short symbols.
Check = Callable[
    [Any, Any, Decimal, Decimal, Decimal, Decimal, list[list[str]], Mapping[str, Decimal]], Awaitable[Decimal]
]
#: `prices(symbols)` -> the latest price of each symbol that has one.
Prices = Callable[[Sequence[str]], Awaitable[dict[str, Decimal]]]


class GroupCommit:
    """Books new orders, many per transaction; `submit` answers the order's row once committed (None:
    its client_order_id is taken), or raises what refused it."""

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[dict[str, Any]]],
        check: Check,
        prices: Prices,
        workers: int = 1,
    ) -> None:
        self.pool = pool
        self.check = check
        self.prices = prices
        self.workers = workers
        self._queue: asyncio.Queue[NewOrder[Any, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="broker-group-commit") for _ in range(self.workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.done.done():
                item.done.set_exception(psycopg.OperationalError("the broker is stopping"))

    async def submit(self, item: NewOrder[Any, Any]) -> Mapping[str, Any] | None:
        self._queue.put_nowait(item)
        return await item.done

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [b for b in batch if not b.done.done()]  # a cancelled submit is not booked
            if not batch:
                continue
            try:
                await self._book(batch)
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
                for item in batch:
                    _settle(item, exc=exc)
            except psycopg.Error:
                # A value one order carries (e.g. out of NUMERIC's range) failed the whole batch: book
                # them one by one, so that only that order fails.
                for item in batch:
                    try:
                        await self._book([item])
                    except Exception as exc:
                        _settle(item, exc=exc)
            except Exception as exc:  # never leave a submit waiting
                _log.error("group commit failed", error=repr(exc), exc_info=exc)
                for item in batch:
                    _settle(item, exc=exc)

    async def _book(self, batch: Sequence[NewOrder[Any, Any]]) -> None:
        ids = sorted({b.account_id for b in batch})
        params = {"a": ids, "s": sorted({b.symbol for b in batch})}
        rows: list[NewOrder[Any, Any]] = []
        refused: list[tuple[NewOrder[Any, Any], BaseException]] = []
        duplicate: list[NewOrder[Any, Any]] = []
        cur = None
        async with self.pool.connection() as conn:
            # One pipeline: BEGIN + the reads (one round trip), the checks here, then the INSERTs +
            # COMMIT (a second round trip, at the end of the block; rows are read after it).
            async with conn.pipeline(), conn.transaction():
                c_acc = await conn.execute(LOCK_ACCOUNTS, params, prepare=True)
                c_res = await conn.execute(OPEN_RESERVED, params, prepare=True)
                c_same = await conn.execute(OPEN_SAME_SIDE, params, prepare=True)
                c_held = await conn.execute(HELD, params, prepare=True)
                cash = {r["id"]: r["cash"] for r in await c_acc.fetchall()}
                reserved = {r["account_id"]: r["reserved"] for r in await c_res.fetchall()}
                same = {
                    (r["account_id"], r["symbol"], r["side"]): r["open_qty"] for r in await c_same.fetchall()
                }
                held: dict[UUID, list[list[str]]] = {}
                for r in await c_held.fetchall():
                    held.setdefault(r["account_id"], []).append([r["symbol"], r["qty"]])
                # Short positions count at market value: their prices, read once for the batch.
                shorts = sorted({h[0] for rows_ in held.values() for h in rows_ if h[1].startswith("-")})
                prices = await self.prices(shorts) if shorts else {}
                coids: set[tuple[UUID, str]] = set()
                for item in batch:
                    key = (item.account_id, item.values["client_order_id"])
                    if key in coids:  # the same client_order_id twice in one batch: the first wins
                        duplicate.append(item)
                        continue
                    if item.account_id not in cash:
                        refused.append((item, NoAccount()))
                        continue
                    side_key = (item.account_id, item.symbol, item.side)
                    try:
                        needed = await self.check(
                            item.account,
                            item.spec,
                            item.values["reserve_price"],
                            cash[item.account_id],
                            reserved.get(item.account_id, ZERO),
                            same.get(side_key, ZERO),
                            [
                                h
                                for h in held.get(item.account_id, [])
                                if h[0] == item.symbol or h[1][0] == "-"
                            ],
                            prices,
                        )
                    except Exception as exc:
                        refused.append((item, exc))
                        continue
                    coids.add(key)
                    item.values["reserved"] = needed
                    reserved[item.account_id] = reserved.get(item.account_id, ZERO) + needed
                    if item.qty is not None:
                        same[side_key] = same.get(side_key, ZERO) + item.qty
                    rows.append(item)
                if rows:
                    cur = conn.cursor()
                    await cur.executemany(INSERT_ORDER_NEW, [b.values for b in rows], returning=True)
            inserted: dict[UUID, Mapping[str, Any]] = {}
            while cur is not None:
                for r in await cur.fetchall():
                    inserted[r["id"]] = r
                if not cur.nextset():
                    break
        for item in rows:
            _settle(item, row=inserted.get(item.values["id"]))
        for item in duplicate:
            _settle(item, row=None)
        for item, why in refused:
            _settle(item, exc=why)


class NoAccount(Exception):
    """The account of a submit is gone (deleted while the order was in flight)."""


def _settle(
    item: NewOrder[Any, Any], *, row: Mapping[str, Any] | None = None, exc: BaseException | None = None
) -> None:
    if item.done.done():
        return
    if exc is not None:
        item.done.set_exception(exc)
    else:
        item.done.set_result(row)


def libpq_url(database_url: str) -> str:
    """The libpq form of a SQLAlchemy URL (`postgresql+psycopg://...` -> `postgresql://...`)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def new_pool(database_url: str, size: int) -> AsyncConnectionPool[AsyncConnection[dict[str, Any]]]:
    """A closed pool (open it with `await pool.open()`); rows come back as dicts."""
    return AsyncConnectionPool(
        libpq_url(database_url),
        min_size=min(4, size),
        max_size=size,
        open=False,
        connection_class=AsyncConnection[dict[str, Any]],
        kwargs={"row_factory": dict_row, "autocommit": False, "prepare_threshold": 0},
        name="broker-hotpath",
    )
