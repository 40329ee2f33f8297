"""The submit hot path in plain psycopg 3: a pool of raw connections, prepared statements, group commit.

SQLAlchemy (Core, async) stays the schema's and Alembic's, and serves the rarer routes. New orders
are written by `GroupCommit`: the submits that arrive while a batch is in flight wait for the next
one. One batch is one risk.check request (the array form, `papertrade.messages`; sent first, its
round trip is the longer) beside round trip 1 of one transaction (one query: BEGIN, take the
accounts' advisory locks, read what open orders hold and the positions that matter in one statement)
and, for accounts that were short at their last batch, the read of their short symbols' prices from
Redis; then round trip 2 (the INSERT and COMMIT), then the book commands. Each submit is answered
after the commit that holds its order and after its command is on the wire.

The pool's connections prepare the statements when they open (`papertrade_broker.prepared`: SQL-level
PREPARE, run by name in simple-protocol queries) and plan them once (`plan_cache_mode =
force_generic_plan`): with array parameters Postgres otherwise keeps choosing a custom plan, i.e.
re-plans on every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar
from uuid import UUID

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import make_url

from papertrade import codec
from papertrade.money import ZERO
from papertrade_broker import prepared
from papertrade_broker.prepared import Statement

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
#: A batch's new orders in one statement: one JSON array (objects keyed by `_COLUMNS`), typed by the
#: `orders` table itself. A taken client_order_id answers no row instead of failing the transaction.
INSERT_ORDERS = Statement(
    "pt_insert_orders",
    ("json",),
    f"INSERT INTO orders ({', '.join(_COLUMNS)}) "
    f"SELECT {', '.join(_COLUMNS)} FROM json_populate_recordset(NULL::orders, $1) "
    "ON CONFLICT DO NOTHING RETURNING id",
)
#: What a new order's row holds beside the values it is inserted with: nothing filled, no fees, no
#: later event (the row is answered from these, not read back: one conversion of ~30 columns less).
NEW_ORDER_STATE: dict[str, Any] = {
    "filled_qty": ZERO,
    "filled_notional": ZERO,
    "fees": ZERO,
    "filled_at": None,
    "expired_at": None,
    "canceled_at": None,
    "failed_at": None,
    "replaced_at": None,
    "replaced_by": None,
    "replaces": None,
    "reason": None,
}

#: Submits (and replaces) of one account are serialized by a transaction-level advisory lock keyed
#: by the account (`account_lock_key`), not by locking the account's row: the ledger's cash updates
#: of that row then never wait for a submit batch, nor a batch for a ledger commit. Keys are taken in
#: ascending order (no deadlock between batches or broker processes).
LOCK_NAMESPACE = 0x42524B52  # "BRKR": the broker's advisory lock space (the two-key form)
LOCK_ACCOUNTS = Statement(
    "pt_lock_accounts",
    ("int[]",),
    f"SELECT count(pg_advisory_xact_lock({LOCK_NAMESPACE}, k)) "
    "FROM (SELECT k FROM unnest($1) AS k ORDER BY k) AS s",
)
#: What the batch's accounts hold, in ONE statement (one snapshot, taken after the locks: the ledger
#: commits cash, positions and order holdings together, so any snapshot is consistent): cash, what
#: open orders reserve and their open quantity per side of the batch's symbols (`order_holds`: a few
#: rows per account, however many orders are open), and the positions that matter (the batch's
#: symbols, and every short).
ACCOUNT_STATE = Statement(
    "pt_account_state",
    ("uuid[]", "text[]"),
    """
SELECT a.id, a.cash,
  (SELECT coalesce(sum(h.reserved), 0) FROM order_holds h WHERE h.account_id = a.id) AS reserved,
  (SELECT json_agg(json_build_array(h.symbol, h.side, h.open_qty::text)) FROM order_holds h
    WHERE h.account_id = a.id AND h.symbol = ANY($2) AND h.open_qty <> 0) AS same_side,
  (SELECT json_agg(json_build_array(p.symbol, p.qty::text)) FROM positions p
    WHERE p.account_id = a.id AND (p.symbol = ANY($2) OR p.qty < 0)) AS held
FROM accounts a WHERE a.id = ANY($1)
""",
)
#: Every statement the pool's connections prepare (`new_pool`).
STATEMENTS = (LOCK_ACCOUNTS, ACCOUNT_STATE, INSERT_ORDERS)
#: The most new orders one transaction books.
MAX_BATCH = 256

_A = TypeVar("_A")
_S = TypeVar("_S")


#: `NewOrder.prepared_for` of an order not prepared (its spec may be anything, None included)
_UNPREPARED: Any = object()


@dataclass
class NewOrder(Generic[_A, _S]):
    """One submit waiting for its batch: `values` are the `orders` row (reserved filled in), `t` the
    exchange time of its risk check and book command."""

    account: _A
    spec: _S
    values: dict[str, Any]
    t: datetime
    done: asyncio.Future[Mapping[str, Any] | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    #: risk approved it (and holds its exposure until the book reports on it, or a release)
    approved: bool = False
    #: what `prepare` built from its row before the commit: the answer to the submit, the book's
    #: command (None: not prepared, the caller builds them), and the `spec` they were built from
    view: dict[str, Any] | None = None
    command: bytes | None = None
    prepared_for: Any = field(default=_UNPREPARED, repr=False)

    @property
    def account_id(self) -> UUID:
        return self.values["account_id"]

    @property
    def symbol(self) -> str:
        return self.values["symbol"]

    @property
    def side(self) -> str:
        return self.values["side"]

    @property
    def qty(self) -> Decimal | None:
        return self.values["qty"]


#: `screen(batch)` asks risk about every order of a batch: per order None (approved; a clip is applied
#: to the order in place) or the exception that refuses it.
Screen = Callable[[Sequence[NewOrder[Any, Any]]], Awaitable[list[BaseException | None]]]
#: `check(account, spec, reference price, cash, reserved, open same side, held, prices)` -> the buying
#: power the order reserves, or raises (an ApiError) to refuse it; `held` is [[symbol, qty text], ...]:
#: the account's position in the order's symbol and its shorts; `prices` the latest prices of the
#: batch's short symbols.
Check = Callable[
    [Any, Any, Decimal, Decimal, Decimal, Decimal, list[list[str]], Mapping[str, Decimal]], Awaitable[Decimal]
]
#: `prices(symbols)` -> the latest price of each symbol that has one.
Prices = Callable[[Sequence[str]], Awaitable[dict[str, Decimal]]]
#: `release(order, reason)`: hand back what risk reserved for an approved order the broker refused.
Release = Callable[[NewOrder[Any, Any], str], None]
#: `route(order, row)`: send a booked order's command to its book; raises to refuse it.
Route = Callable[[NewOrder[Any, Any], Mapping[str, Any]], Awaitable[None]]
#: `prepare(order, row)`: build what answering and routing a booked order need (`NewOrder.view`,
#: `NewOrder.command`) from its row (as it will be inserted, but for `reserved`, which the buying
#: power check sets later) before the commit: while risk's answer is awaited when it comes after
#: round trip 1 (again for an order risk clips), else just before round trip 2. After the commit
#: that CPU would delay both the answers and the next batch. Unused for an order refused meanwhile or
#: found taken by the INSERT (its client_order_id).
Prepare = Callable[[NewOrder[Any, Any], Mapping[str, Any]], None]


class GroupCommit:
    """Books new orders, many per transaction; `submit` answers the order's row once committed and
    routed (None: its client_order_id is taken), or raises what refused it.

    A batch is everything queued when a worker is free. Risk is asked about the whole batch (`screen`)
    while round trip 1 locks its accounts and reads what they hold; then buying power is checked, the
    orders that pass are inserted and committed (round trip 2) and their commands published (`route`),
    all before any submit is answered. The worker, not the request, owns that sequence: a client that
    goes away once its order is in a batch still gets it booked and routed, never left pending without
    its command. Every refusal after risk's approval hands the reservation back (`release`)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[dict[str, Any]]],
        *,
        screen: Screen,
        check: Check,
        prices: Prices,
        release: Release,
        route: Route,
        prepare: Prepare | None = None,
        workers: int = 1,
    ) -> None:
        self.pool = pool
        self.screen = screen
        self.check = check
        self.prices = prices
        self.release = release
        self.route = route
        self.prepare = prepare
        self.workers = workers
        self._queue: asyncio.Queue[NewOrder[Any, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy = 0
        #: the symbols each account was short in at its last batch: their prices are read beside
        #: round trip 1 (a short found only then costs a read after it)
        self._shorts: dict[UUID, frozenset[str]] = {}

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="broker-group-commit") for _ in range(self.workers)
        ]

    async def stop(self, timeout: float = 5.0) -> None:
        """Book what is queued or in flight (up to `timeout` seconds), then stop; a submit still
        waiting after that is answered with an error (its order was not booked)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._busy or not self._queue.empty()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
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
            self._busy += 1
            try:
                await self._process(batch)
            finally:
                self._busy -= 1

    async def _process(self, batch: list[NewOrder[Any, Any]]) -> None:
        screening = asyncio.ensure_future(self.screen(batch))
        # Risk's round trip is the longer of the two that start here: its request goes out first (the
        # task's first step queues it, nats-py's flusher writes it on the next turn of the loop).
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        try:
            booked = await self._book(batch, screening)
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            await self._refuse_all(batch, screening, exc)
            return
        except psycopg.Error as exc:
            # A value one order carries (e.g. out of NUMERIC's range) failed the whole batch: book the
            # approved ones one by one (risk is not asked again), so that only that order fails.
            if not await _screening_done(batch, screening):
                await self._refuse_all(batch, screening, exc)
                return
            booked = []
            for item in batch:
                if not item.approved:
                    continue
                try:
                    booked += await self._book([item], None)
                except Exception as exc:
                    self._refuse(item, exc)
        except Exception as exc:  # never leave a submit waiting
            _log.error("group commit failed", error=repr(exc), exc_info=exc)
            await self._refuse_all(batch, screening, exc)
            return
        for item, row in booked:
            try:
                await self.route(item, row)
            except Exception as exc:  # the command was not sent: `route` rejected the order
                _settle(item, exc=exc)
                continue
            _settle(item, row=row)

    async def _book(
        self,
        batch: Sequence[NewOrder[Any, Any]],
        screening: asyncio.Future[list[BaseException | None]] | None,
    ) -> list[tuple[NewOrder[Any, Any], Mapping[str, Any]]]:
        """Round trip 1 (locks, state) beside risk's screening, the checks, round trip 2 (INSERTs,
        COMMIT). Refusals are settled here; the booked orders are returned with their rows."""
        ids = sorted({b.account_id for b in batch})
        keys = sorted({account_lock_key(a) for a in ids})
        symbols = sorted({b.symbol for b in batch})
        rows: list[NewOrder[Any, Any]] = []
        #: a client_order_id taken earlier in this batch: answered once the first one is committed
        repeats: list[NewOrder[Any, Any]] = []
        inserted: set[UUID] = set()
        early = sorted({s for a in ids for s in self._shorts.get(a, ())})
        prefetch = _prefetch(self.prices(early)) if early else None
        async with self.pool.connection() as conn, prepared.transaction(conn):
            # Two round trips: BEGIN + the account locks + the read, the checks here, then the
            # INSERT + COMMIT.
            _, _, state = await prepared.run(
                conn,
                prepared.BEGIN,
                LOCK_ACCOUNTS(prepared.ints(keys)),
                ACCOUNT_STATE(prepared.uuids(ids), prepared.texts(conn, symbols)),
            )
            cash: dict[UUID, Decimal] = {}
            reserved: dict[UUID, Decimal] = {}
            same: dict[tuple[UUID, str, str], Decimal] = {}
            held: dict[UUID, list[list[str]]] = {}
            for r in state:
                cash[r["id"]] = r["cash"]
                reserved[r["id"]] = r["reserved"]
                for symbol, side, open_qty in r["same_side"] or []:
                    same[(r["id"], symbol, side)] = Decimal(open_qty)
                held[r["id"]] = [[symbol, qty] for symbol, qty in r["held"] or []]
            if screening is not None:
                if not screening.done():  # risk answers later than round trip 1: its wait pays for these
                    self._prepare(batch)
                _screened(batch, await screening)
            # Short positions count at market value: their prices, read once for the batch.
            shorts = self._short_symbols(ids, held)
            prices = await prefetch if prefetch is not None and shorts else {}
            if missing := sorted(shorts.difference(early)):
                prices |= await self.prices(missing)
            coids: set[tuple[UUID, str]] = set()
            for item in batch:
                if not item.approved:
                    continue
                key = (item.account_id, item.values["client_order_id"])
                if key in coids:  # the same client_order_id twice in one batch: the first wins
                    repeats.append(item)
                    continue
                if item.account_id not in cash:
                    self._refuse(item, NoAccount())
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
                        [h for h in held.get(item.account_id, []) if h[0] == item.symbol or h[1][0] == "-"],
                        prices,
                    )
                except Exception as exc:
                    self._refuse(item, exc)
                    continue
                coids.add(key)
                item.values["reserved"] = needed
                reserved[item.account_id] = reserved.get(item.account_id, ZERO) + needed
                if item.qty is not None:
                    same[side_key] = same.get(side_key, ZERO) + item.qty
                rows.append(item)
            if rows:
                self._prepare([b for b in rows if b.prepared_for is not b.spec])  # clipped by risk, or new
                values = [{c: b.values[c] for c in _COLUMNS} for b in rows]
                written, _ = await prepared.run(
                    conn, INSERT_ORDERS(prepared.text(conn, codec.encode(values))), prepared.COMMIT
                )
                inserted = {r["id"] for r in written}
            else:
                await prepared.run(conn, prepared.COMMIT)
        booked: list[tuple[NewOrder[Any, Any], Mapping[str, Any]]] = []
        for item in rows:
            if item.values["id"] in inserted:
                booked.append((item, {**NEW_ORDER_STATE, **item.values}))
            else:  # a concurrent request with the same client_order_id won
                self._duplicate(item)
        for item in repeats:
            self._duplicate(item)
        return booked

    def _prepare(self, items: Sequence[NewOrder[Any, Any]]) -> None:
        """`prepare` each order (a failure leaves it to the caller, after the commit)."""
        if self.prepare is None:
            return
        for item in items:
            try:
                self.prepare(item, {**NEW_ORDER_STATE, **item.values})
            except Exception as exc:
                item.view = item.command = None
                item.prepared_for = _UNPREPARED
                _log.warning("order answer not prepared", error=repr(exc))
                continue
            item.prepared_for = item.spec

    def _short_symbols(self, ids: Sequence[UUID], held: Mapping[UUID, list[list[str]]]) -> set[str]:
        """The symbols the batch's accounts are short in (remembered per account for the next batch)."""
        out: set[str] = set()
        for account in ids:
            short = frozenset(h[0] for h in held.get(account, ()) if h[1].startswith("-"))
            if short:
                self._shorts[account] = short
                out |= short
            else:
                self._shorts.pop(account, None)
        return out

    def _refuse(self, item: NewOrder[Any, Any], exc: BaseException) -> None:
        """An approved order the broker refuses: risk gets its reservation back."""
        self.release(item, _refusal(exc))
        _settle(item, exc=exc)

    def _duplicate(self, item: NewOrder[Any, Any]) -> None:
        self.release(item, "duplicate client_order_id")
        _settle(item, row=None)

    async def _refuse_all(
        self,
        batch: Sequence[NewOrder[Any, Any]],
        screening: asyncio.Future[list[BaseException | None]],
        exc: BaseException,
    ) -> None:
        """The batch failed as a whole (e.g. the database is gone): what risk approved is released."""
        await _screening_done(batch, screening)
        for item in batch:
            if item.approved:
                self._refuse(item, exc)
            else:
                _settle(item, exc=exc)


class NoAccount(Exception):
    """The account of a submit is gone (deleted while the order was in flight)."""


async def _screening_done(
    batch: Sequence[NewOrder[Any, Any]], screening: asyncio.Future[list[BaseException | None]]
) -> bool:
    """Wait for risk's answers on `batch` and apply them (`_screened`); False if there are none."""
    if not screening.done():
        await asyncio.wait([screening])
    if screening.cancelled() or screening.exception() is not None:
        return False
    _screened(batch, screening.result())
    return True


def _prefetch(read: Awaitable[dict[str, Decimal]]) -> asyncio.Future[dict[str, Decimal]]:
    """A read started now, awaited only if needed: its failure is retrieved either way (not logged as
    never retrieved when the batch no longer needs it)."""
    fut = asyncio.ensure_future(read)
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


def _screened(batch: Sequence[NewOrder[Any, Any]], refusals: Sequence[BaseException | None]) -> None:
    """Risk's answers on `batch`: the approved orders marked, the refused ones answered. Applying them
    again changes nothing."""
    for item, refusal in zip(batch, refusals, strict=True):
        if refusal is None:
            item.approved = True
        else:
            _settle(item, exc=refusal)


def _refusal(exc: BaseException) -> str:
    """What a refusal tells risk (`risk.release`'s reason)."""
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        return message
    return f"refused by the broker ({type(exc).__name__})"


def _settle(
    item: NewOrder[Any, Any], *, row: Mapping[str, Any] | None = None, exc: BaseException | None = None
) -> None:
    if item.done.done():
        return
    if exc is not None:
        item.done.set_exception(exc)
    else:
        item.done.set_result(row)


def account_lock_key(account_id: UUID) -> int:
    """The second key of an account's advisory lock (`LOCK_NAMESPACE` is the first): 32 bits of its id."""
    return (account_id.int & 0xFFFFFFFF) - (1 << 31)


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
        kwargs={
            "row_factory": dict_row,
            **prepared.CONNECTION,
        },
        configure=_prepare,
        name="broker-hotpath",
    )


async def _prepare(conn: AsyncConnection[dict[str, Any]]) -> None:
    await prepared.prepare(conn, STATEMENTS)
