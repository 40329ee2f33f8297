"""The ledger consumer: execution reports from JetStream (EX_EXEC) into Postgres, then trade updates.

A durable pull consumer (`streams.exec_consumer`) is read by `papertrade.bus.pull.Puller` (one inbox
subscription, `CONSUMER.MSG.NEXT` requests kept outstanding, so NATS delivers the next reports while a
batch is being committed). What has arrived when the previous batch is done is the
next batch: one transaction in two round trips (1: the batch's orders locked in id order, the
executions already booked, the positions locked, unknown commission models; 2: ONE statement that
inserts the executions, upserts the positions, updates the orders and the accounts' cash from JSON
parameters, and the COMMIT). Every message of the batch is acked only after the commit. A
redelivered report finds its execution row (fills) or its order already past that state (everything
else) and changes nothing. Reports of accounts the broker does not keep (the liquidity agent's) are
acked and skipped; unreadable ones are kept in `ledger_dead_letters` and acked; a report that fails
on its own is retried (nak with a delay) and, after `MAX_DELIVERIES`, kept there too and terminated
with an error log, so it never holds the stream up and is never gone (a report whose dead letter
Postgres did not take is redelivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cache, lru_cache
from typing import Any
from uuid import UUID

import psycopg
import structlog
import uvloop
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from psycopg.rows import dict_row

from papertrade import codec
from papertrade.bus import subjects
from papertrade.bus.connect import connect_nats
from papertrade.bus.pull import exec_puller
from papertrade.bus.streams import stored_at
from papertrade.enums import ExecType, OrderStatus, Side
from papertrade.errors import ValidationError
from papertrade.ledger import CommissionModel, PositionState, apply_fill, cash_delta
from papertrade.messages import ExecReport, TradeUpdate
from papertrade.money import ZERO
from papertrade.service.logs import configure_logging
from papertrade.stack.procs import batch_scheduling, die_with_parent, settle_heap
from papertrade.timeutil import utcnow
from papertrade_broker import prepared
from papertrade_broker.hotpath import libpq_url
from papertrade_broker.prepared import Statement
from papertrade_broker.settings import BrokerSettings
from papertrade_broker.views import OrderViews

_log = structlog.get_logger("papertrade_broker.ledger")

DURABLE = "broker-ledger"
#: The most reports booked in one transaction. Measured (bench_ledger): 256 beats 1,024 on throughput
#: and latency (a long transaction holds everything behind it) and 128 (fixed costs per statement).
MAX_BATCH = 256
#: Deliveries of a report that fails on its own before it is set aside (`ledger_dead_letters`,
#: logged) instead of retried.
MAX_DELIVERIES = 5
#: A report set aside: one row per stream sequence (a repeat of one already kept changes nothing).
INSERT_DEAD_LETTER = (
    "INSERT INTO ledger_dead_letters (stream_seq, subject, deliveries, reason, data) "
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (stream_seq) DO NOTHING"
)
#: How often the ledger process sends its metrics to the broker process (seconds).
METRICS_EVERY = 1.0

# Statements prepared when the ledger's connection opens and run several to a round trip
# (`papertrade_broker.prepared`). Every one is written so that its generic plan finds rows by index
# (`= ANY(array)`).
#: The batch's orders (and, for refused replaces, their replacements), locked in id order.
LOCK_ORDERS = Statement(
    "pt_ledger_lock_orders",
    ("uuid[]", "uuid[]"),
    """
SELECT * FROM orders
WHERE id = ANY(ARRAY(SELECT unnest($1) UNION SELECT replaced_by FROM orders WHERE id = ANY($2)))
ORDER BY id FOR UPDATE
""",
)
#: Executions already booked among the batch's (each pair looked up in the primary key).
SEEN_EXECS = Statement(
    "pt_ledger_seen_execs",
    ("text[]", "uuid[]"),
    """
SELECT e.exec_id, e.order_id FROM unnest($1, $2) AS k(exec_id, order_id)
JOIN executions e ON e.exec_id = k.exec_id AND e.order_id = k.order_id
""",
)
#: The positions the batch's fills move: keyed by the filled orders' own account and symbol.
LOCK_POSITIONS = Statement(
    "pt_ledger_lock_positions",
    ("uuid[]",),
    """
SELECT account_id, symbol, qty, cost, realized_pl FROM positions
WHERE (account_id, symbol) IN (SELECT account_id, symbol FROM orders WHERE id = ANY($1))
ORDER BY account_id, symbol FOR UPDATE
""",
)
#: Commission models of the filled orders' accounts that are not cached yet.
COMMISSIONS = Statement(
    "pt_ledger_commissions",
    ("uuid[]", "uuid[]"),
    """
SELECT id, commission FROM accounts
WHERE id = ANY(ARRAY(SELECT account_id FROM orders WHERE id = ANY($1))) AND NOT (id = ANY($2))
""",
)
ACCOUNT_COMMISSIONS = Statement(
    "pt_ledger_account_commissions", ("uuid[]",), "SELECT id, commission FROM accounts WHERE id = ANY($1)"
)
#: Everything a batch writes, in one statement: each part reads its rows from a JSON array (decimals
#: as strings: exact). The last SELECT fails the statement (and so the transaction) unless every
#: execution was new, and every order was found: a batch never moves cash for a fill booked twice.
WRITE = Statement(
    "pt_ledger_write",
    ("json", "json", "json", "json", "timestamptz", "int", "int", "uuid[]", "uuid[]"),
    """
WITH x_exec AS (
  INSERT INTO executions (exec_id, order_id, account_id, symbol, side, qty, price, fee, liquidity,
                          cum_qty, leaves_qty, t, recorded_at)
  SELECT exec_id, order_id, account_id, symbol, side, qty, price, fee, liquidity, cum_qty, leaves_qty,
         t, recorded_at
  FROM json_to_recordset($1) AS x(exec_id text, order_id uuid, account_id uuid,
       symbol text, side text, qty numeric, price numeric, fee numeric, liquidity text, cum_qty numeric,
       leaves_qty numeric, t timestamptz, recorded_at timestamptz)
  ON CONFLICT DO NOTHING
  RETURNING 1
), x_pos AS (
  INSERT INTO positions (account_id, symbol, qty, cost, realized_pl, updated_at)
  SELECT account_id, symbol, qty, cost, realized_pl, $5
  FROM json_to_recordset($2) AS x(account_id uuid, symbol text, qty numeric,
       cost numeric, realized_pl numeric)
  ON CONFLICT (account_id, symbol) DO UPDATE SET qty = EXCLUDED.qty, cost = EXCLUDED.cost,
    realized_pl = EXCLUDED.realized_pl, updated_at = EXCLUDED.updated_at
  RETURNING 1
), x_ord AS (
  UPDATE orders o SET status = x.status, filled_qty = x.filled_qty, filled_notional = x.filled_notional,
    fees = x.fees, reserved = x.reserved, updated_at = x.updated_at, filled_at = x.filled_at,
    canceled_at = x.canceled_at, expired_at = x.expired_at, failed_at = x.failed_at,
    replaced_at = x.replaced_at, replaced_by = x.replaced_by, reason = x.reason
  FROM json_to_recordset($3) AS x(id uuid, status text, filled_qty numeric,
       filled_notional numeric, fees numeric, reserved numeric, updated_at timestamptz,
       filled_at timestamptz, canceled_at timestamptz, expired_at timestamptz, failed_at timestamptz,
       replaced_at timestamptz, replaced_by uuid, reason text)
  WHERE o.id = x.id AND o.id = ANY($8)
  RETURNING 1
), x_acct AS (
  UPDATE accounts a SET cash = a.cash + x.cash, fees = a.fees + x.fees,
    realized_pl = a.realized_pl + x.realized
  FROM json_to_recordset($4) AS x(id uuid, cash numeric, fees numeric, realized numeric)
  WHERE a.id = x.id AND a.id = ANY($9)
  RETURNING 1
)
SELECT CASE
  WHEN (SELECT count(*) FROM x_exec) = $6 AND (SELECT count(*) FROM x_ord) = $7
       AND (SELECT count(*) FROM x_pos) >= 0 AND (SELECT count(*) FROM x_acct) >= 0
  THEN 0
  ELSE ('ledger batch refused: ' || (SELECT count(*) FROM x_exec) || ' new executions of '
        || $6 || ', ' || (SELECT count(*) FROM x_ord) || ' orders of ' || $7)::int
END
""",
)
#: What a report changes on an order (the whole state the batch computed, by id).
_ORDER_COLUMNS = (
    "status",
    "filled_qty",
    "filled_notional",
    "fees",
    "reserved",
    "updated_at",
    "filled_at",
    "canceled_at",
    "expired_at",
    "failed_at",
    "replaced_at",
    "replaced_by",
    "reason",
)
UNREPLACE = Statement(
    "pt_ledger_unreplace",
    ("uuid[]",),
    "UPDATE orders SET replaced_by = NULL WHERE id = ANY($1) AND status <> 'replaced'",
)
#: Every statement the ledger's connection prepares.
STATEMENTS = (LOCK_ORDERS, SEEN_EXECS, LOCK_POSITIONS, COMMISSIONS, ACCOUNT_COMMISSIONS, WRITE, UNREPLACE)

REPORTS = Counter("papertrade_broker_exec_reports_total", "Execution reports consumed", ["exec", "outcome"])
BATCH_SECONDS = Histogram(
    "papertrade_broker_ledger_batch_seconds",
    "Time to apply and commit one batch of execution reports",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
FILL_TO_COMMIT = Histogram(
    "papertrade_broker_fill_to_commit_seconds",
    "From a fill report's storage in the exec stream (JetStream's clock) to its ledger commit",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 5),
)

_EVENT_OF = {
    ExecType.ACCEPTED: "new",
    ExecType.CANCELED: "canceled",
    ExecType.EXPIRED: "expired",
    ExecType.REJECTED: "rejected",
    ExecType.REPLACED: "replaced",
}
_ACK = b"+ACK"
_TERM = b"+TERM"


@dataclass
class _Batch:
    """The state one batch works on: locked orders, positions, account deltas, rows to write."""

    orders: dict[UUID, dict[str, Any]]
    now: datetime
    positions: dict[tuple[UUID, str], PositionState] = field(default_factory=dict)
    seen_execs: set[tuple[str, UUID]] = field(default_factory=set)
    new_execs: list[dict[str, Any]] = field(default_factory=list)
    dirty_orders: set[UUID] = field(default_factory=set)
    dirty_positions: set[tuple[UUID, str]] = field(default_factory=set)
    cash: dict[UUID, Decimal] = field(default_factory=dict)
    fees: dict[UUID, Decimal] = field(default_factory=dict)
    realized: dict[UUID, Decimal] = field(default_factory=dict)
    updates: list[tuple[UUID, TradeUpdate]] = field(default_factory=list)
    fills: list[ExecReport] = field(default_factory=list)  # the fill reports booked
    unreplace: set[UUID] = field(default_factory=set)


class LedgerConsumer:
    """Books execution reports. `run()` owns its NATS connection and Postgres connection, so it can run
    on its own process (`LedgerProcess`), apart from the HTTP handlers."""

    #: Seconds a failed report waits before its redelivery.
    retry_delay = 1.0

    def __init__(self, settings: BrokerSettings, durable: str = DURABLE) -> None:
        self.settings = settings
        self.durable = durable
        self.applied = 0
        self.ready = False
        self.stopping = threading.Event()
        self._db: psycopg.AsyncConnection[dict[str, Any]] | None = None
        self._nc: NATS | None = None
        self._commissions: dict[UUID, CommissionModel] = {}
        self._views = OrderViews()

    async def run(self) -> None:
        """Consume until `stopping` is set; reconnects and resubscribes on its own."""
        try:
            while not self.stopping.is_set():
                try:
                    await self._consume()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    _log.warning("ledger consumer restarting", error=repr(exc))
                    await asyncio.sleep(0.5)
        finally:
            self.ready = False
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.close()
            if self._db is not None:
                with contextlib.suppress(Exception):
                    await self._db.close()

    async def handle(self, msgs: Sequence[Msg]) -> None:
        """Apply a batch in one transaction, then ack; on a failure, retry message by message."""
        reports: list[tuple[Msg, ExecReport | None]] = []
        unreadable: list[tuple[Msg, str]] = []
        for msg in msgs:
            try:
                reports.append((msg, codec.decode(msg.data, ExecReport)))
            except ValidationError as exc:
                _log.error("unreadable execution report skipped", subject=msg.subject, error=str(exc))
                _counter("unknown", "unreadable").inc()
                unreadable.append((msg, f"unreadable: {exc}"))
        if unreadable:  # kept as dead letters, then acked with the batch; else redelivered later
            kept = await self._dead_letter(unreadable)
            for msg, _ in unreadable:
                if kept:
                    reports.append((msg, None))
                else:
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=self.retry_delay)
        valid = [r for _, r in reports if r is not None]
        try:
            batch = await self._apply(valid)
        except Exception as exc:
            _log.warning("batch failed, applying one by one", error=repr(exc), size=len(valid))
            await self._one_by_one(reports)
            return
        await self._after_commit(batch, reports)
        await self._ack([msg for msg, _ in reports])

    async def _consume(self) -> None:
        if self._nc is None or self._nc.is_closed:
            self._nc = await connect_nats(self.settings.nats_url, "broker-ledger")
        puller = await exec_puller(self._nc, self.durable)
        self.ready = True
        try:
            while not self.stopping.is_set():
                msgs = await puller.next_batch(0.5, MAX_BATCH)
                if msgs:
                    await self.handle(msgs)
        finally:
            self.ready = False
            await puller.stop()

    async def _one_by_one(self, reports: Sequence[tuple[Msg, ExecReport | None]]) -> None:
        """Each report in its own transaction: one that fails is retried later, and dropped (logged)
        once it has failed `MAX_DELIVERIES` times, so it never holds the stream up (unless the failure
        is Postgres's: unreachable, deadlock, serialization; those are retried for as long as it takes)."""
        for msg, report in reports:
            if report is not None:
                try:
                    one = await self._apply([report])
                except Exception as exc:
                    deliveries = _deliveries(msg)
                    # Postgres unreachable, a deadlock, a serialization failure: never the report's fault.
                    transient = isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
                    if (
                        deliveries >= MAX_DELIVERIES
                        and not transient
                        and await self._dead_letter([(msg, f"failed {deliveries} times: {exc!r}")])
                    ):
                        _log.error(
                            "execution report dropped after repeated failures",
                            error=repr(exc),
                            deliveries=deliveries,
                            subject=msg.subject,
                            data=msg.data[:500].decode(errors="replace"),
                            kept_in="ledger_dead_letters",
                        )
                        _counter(report.exec.value, "dropped").inc()
                        await self._send(msg, _TERM)
                    else:
                        _log.error("execution report failed; it will be redelivered", error=repr(exc))
                        with contextlib.suppress(Exception):
                            await msg.nak(delay=self.retry_delay)
                    continue
                await self._after_commit(one, [(msg, report)])
            await self._send(msg, _ACK)

    async def _ack(self, msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            await self._send(msg, _ACK)

    async def _send(self, msg: Msg, what: bytes) -> None:
        nc = self._nc
        if nc is not None and msg.reply:
            await nc.publish(msg.reply, what)

    async def _after_commit(self, batch: _Batch, reports: Sequence[tuple[Msg, ExecReport | None]]) -> None:
        """Time the fills booked (from their storage in the stream) and publish the trade updates."""
        if batch.fills:
            now = time.time()
            booked = {id(r) for r in batch.fills}
            for msg, report in reports:
                if id(report) in booked and (stored := stored_at(msg)) is not None:
                    FILL_TO_COMMIT.observe(max(now - stored, 0.0))
        nc = self._nc
        assert nc is not None
        for account_id, upd in batch.updates:
            await nc.publish(_event_subject(account_id), codec.encode(upd))

    async def _apply(self, reports: Sequence[ExecReport]) -> _Batch:
        start = time.perf_counter()
        batch = _Batch(orders={}, now=utcnow())
        if not reports:
            return batch
        ids = {r.order_id for r in reports} | {r.new_order_id for r in reports if r.new_order_id}
        refused_replaces = {
            r.order_id for r in reports if r.exec is ExecType.REJECTED and r.command == "replace"
        }
        fills = [r for r in reports if r.exec is ExecType.FILL and r.exec_id]
        fill_orders = {r.order_id for r in fills}
        conn = await self._connection()
        # The locking reads go out with the BEGIN (round trip 1), the write statement with the COMMIT
        # (round trip 2).
        async with prepared.transaction(conn):
            reads = [
                prepared.BEGIN,
                LOCK_ORDERS(prepared.uuids(ids), prepared.uuids(refused_replaces)),
            ]
            models = False
            if fills:
                filled = prepared.uuids(fill_orders)
                keys = list({(f.exec_id or "", f.order_id) for f in fills})
                reads.append(
                    SEEN_EXECS(prepared.texts(conn, (k[0] for k in keys)), prepared.uuids(k[1] for k in keys))
                )
                reads.append(LOCK_POSITIONS(filled))
                models = bool({f.account_id for f in fills} - set(self._commissions))
                if models:
                    reads.append(COMMISSIONS(filled, prepared.uuids(self._commissions)))
            results = await prepared.run(conn, *reads)
            batch.orders = {r["id"]: r for r in results[1]}
            if fills:
                batch.seen_execs = {(r["exec_id"], r["order_id"]) for r in results[2]}
                for r in results[3]:
                    batch.positions[(r["account_id"], r["symbol"])] = PositionState(
                        r["qty"], r["cost"], r["realized_pl"]
                    )
                for r in results[4] if models else []:
                    self._commissions[r["id"]] = CommissionModel.parse(r["commission"])
            unknown = {batch.orders[f.order_id]["account_id"] for f in fills if f.order_id in batch.orders}
            unknown -= set(self._commissions)
            if unknown:  # a report that named another account than its order's (a third round trip)
                (more,) = await prepared.run(conn, ACCOUNT_COMMISSIONS(prepared.uuids(unknown)))
                for r in more:
                    self._commissions[r["id"]] = CommissionModel.parse(r["commission"])
            for report in reports:
                order = batch.orders.get(report.order_id)
                if order is None:
                    _counter(report.exec.value, "skipped").inc()
                    continue
                self._apply_one(batch, report, order)
            await prepared.run(conn, *self._writes(conn, batch), prepared.COMMIT)
        BATCH_SECONDS.observe(time.perf_counter() - start)
        self.applied += len(reports)
        return batch

    async def _dead_letter(self, msgs: Sequence[tuple[Msg, str]]) -> bool:
        """Keep reports the ledger cannot book in `ledger_dead_letters` (the bytes as received, the
        subject, the stream sequence, why), so none is gone; False if Postgres did not take them."""
        rows = [(_stream_seq(m), m.subject, _deliveries(m), why[:2000], m.data) for m, why in msgs]
        try:
            conn = await self._connection()
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(INSERT_DEAD_LETTER, rows)
        except Exception as exc:
            _log.error("dead letters not stored; the reports stay in the stream", error=repr(exc))
            return False
        return True

    async def _connection(self) -> psycopg.AsyncConnection[dict[str, Any]]:
        """The ledger's own Postgres connection (plain psycopg, prepared generic plans), reopened if lost."""
        if self._db is None or self._db.closed or self._db.broken:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    await self._db.close()
            self._db = await psycopg.AsyncConnection.connect(
                libpq_url(self.settings.database_url),
                row_factory=dict_row,
                **prepared.CONNECTION,
            )
            await prepared.prepare(self._db, STATEMENTS)
        return self._db

    def _apply_one(self, batch: _Batch, report: ExecReport, order: dict[str, Any]) -> None:
        status = OrderStatus(order["status"])
        now = batch.now
        kind = report.exec
        if kind is ExecType.FILL:
            self._apply_fill(batch, report, order, now)
            return
        if kind is ExecType.ACCEPTED:
            if status not in (OrderStatus.PENDING_NEW, OrderStatus.ACCEPTED):
                _counter(kind.value, "stale").inc()
                return
            order["status"] = OrderStatus.NEW.value
        elif kind in (ExecType.CANCELED, ExecType.EXPIRED):
            if status.is_final:
                _counter(kind.value, "stale").inc()
                return
            final = OrderStatus.CANCELED if kind is ExecType.CANCELED else OrderStatus.EXPIRED
            order["status"] = final.value
            order["canceled_at" if final is OrderStatus.CANCELED else "expired_at"] = report.t
            order["reserved"] = ZERO
            order["reason"] = report.reason or order["reason"]
            self._clear_replace(batch, order)
        elif kind is ExecType.REJECTED and report.command == "replace":
            # The book refused to replace `order_id`: it keeps working; its replacement is rejected.
            new = batch.orders.get(order["replaced_by"]) if order["replaced_by"] else None
            order["replaced_by"] = None
            batch.dirty_orders.add(order["id"])
            if new is None or OrderStatus(new["status"]).is_final:
                _counter(kind.value, "stale").inc()
                return
            new["status"] = OrderStatus.REJECTED.value
            new["failed_at"] = report.t
            new["reserved"] = ZERO
            new["reason"] = report.reason
            new["updated_at"] = now
            batch.dirty_orders.add(new["id"])
            _counter(kind.value, "applied").inc()
            batch.updates.append(
                (
                    new["account_id"],
                    TradeUpdate(event="rejected", order=self._views.view(new), timestamp=report.t),
                )
            )
            return
        elif kind is ExecType.REJECTED and report.command == "cancel":
            if status is not OrderStatus.PENDING_CANCEL:
                _counter(kind.value, "stale").inc()
                return
            order["status"] = (
                OrderStatus.PARTIALLY_FILLED.value if order["filled_qty"] > 0 else OrderStatus.NEW.value
            )
            order["updated_at"] = now
            batch.dirty_orders.add(order["id"])
            _counter(kind.value, "applied").inc()
            return
        elif kind is ExecType.REJECTED:
            if status in (OrderStatus.PENDING_NEW, OrderStatus.ACCEPTED):
                order["status"] = OrderStatus.REJECTED.value
                order["failed_at"] = report.t
                order["reserved"] = ZERO
                order["reason"] = report.reason
                self._clear_replace(batch, order)
            elif status is OrderStatus.PENDING_CANCEL:
                # The book refused the cancel: the order keeps working.
                order["status"] = (
                    OrderStatus.PARTIALLY_FILLED.value if order["filled_qty"] > 0 else OrderStatus.NEW.value
                )
                order["reason"] = report.reason
            else:
                _counter(kind.value, "stale").inc()
                return
        elif kind is ExecType.REPLACED:
            if status.is_final:
                _counter(kind.value, "stale").inc()
                return
            order["status"] = OrderStatus.REPLACED.value
            order["replaced_at"] = report.t
            order["replaced_by"] = report.new_order_id
            order["reserved"] = ZERO
            new = batch.orders.get(report.new_order_id) if report.new_order_id else None
            if new is not None:
                # Fills of the old order since the PATCH count toward the new order's total.
                new["filled_qty"] = order["filled_qty"]
                new["filled_notional"] = order["filled_notional"]
                new["fees"] = order["fees"]
                new["reserved"] = max((new["qty"] or ZERO) - new["filled_qty"], ZERO) * new["reserve_price"]
                batch.dirty_orders.add(new["id"])
            if new is not None and OrderStatus(new["status"]) in (
                OrderStatus.PENDING_NEW,
                OrderStatus.ACCEPTED,
            ):
                new["status"] = (
                    OrderStatus.PARTIALLY_FILLED.value if new["filled_qty"] > 0 else OrderStatus.NEW.value
                )
                new["updated_at"] = now
                batch.dirty_orders.add(new["id"])
        elif kind is ExecType.TRIGGERED:
            _counter(kind.value, "applied").inc()
            return
        else:
            return
        order["updated_at"] = now
        batch.dirty_orders.add(order["id"])
        _counter(kind.value, "applied").inc()
        batch.updates.append(
            (
                order["account_id"],
                TradeUpdate(event=_EVENT_OF[kind], order=self._views.view(order), timestamp=report.t),
            )
        )

    def _apply_fill(self, batch: _Batch, report: ExecReport, order: dict[str, Any], now: datetime) -> None:
        assert report.exec_id is not None
        key = (report.exec_id, report.order_id)
        if key in batch.seen_execs or report.qty is None or report.price is None or report.qty <= 0:
            _counter("fill", "duplicate").inc()
            return
        batch.seen_execs.add(key)
        account_id: UUID = order["account_id"]
        side = Side(order["side"])
        qty, price = report.qty, report.price
        commission = self._commissions.get(account_id) or _NO_COMMISSION
        fee = commission.fill_fee(
            side,
            qty,
            price,
            prior_qty=order["filled_qty"],
            prior_notional=order["filled_notional"],
            prior_fee=order["fees"],
        )
        pkey = (account_id, order["symbol"])
        pos, realized = apply_fill(batch.positions.get(pkey, _FLAT), side, qty, price)
        batch.positions[pkey] = pos
        batch.dirty_positions.add(pkey)
        batch.cash[account_id] = batch.cash.get(account_id, ZERO) + cash_delta(side, qty, price, fee)
        batch.fees[account_id] = batch.fees.get(account_id, ZERO) + fee
        batch.realized[account_id] = batch.realized.get(account_id, ZERO) + realized

        order["filled_qty"] += qty
        order["filled_notional"] += qty * price
        order["fees"] += fee
        leaves = report.leaves_qty
        if order["qty"] is not None:
            remaining = max(order["qty"] - order["filled_qty"], ZERO)
            done = remaining == 0 or leaves == 0
            order["reserved"] = ZERO if done else remaining * order["reserve_price"]
        else:
            done = leaves == 0
            spent = order["filled_notional"]
            order["reserved"] = ZERO if done or side is Side.SELL else max(order["notional"] - spent, ZERO)
        status = OrderStatus(order["status"])
        if done:
            order["status"] = OrderStatus.FILLED.value
            order["filled_at"] = report.t
            order["reserved"] = ZERO
        elif status is not OrderStatus.PENDING_CANCEL:
            order["status"] = OrderStatus.PARTIALLY_FILLED.value
        order["updated_at"] = now
        batch.dirty_orders.add(order["id"])
        batch.new_execs.append(
            {
                "exec_id": report.exec_id,
                "order_id": report.order_id,
                "account_id": account_id,
                "symbol": order["symbol"],
                "side": side.value,
                "qty": qty,
                "price": price,
                "fee": fee,
                "liquidity": report.liquidity.value if report.liquidity else None,
                "cum_qty": order["filled_qty"],
                "leaves_qty": leaves
                if leaves is not None
                else max((order["qty"] or ZERO) - order["filled_qty"], ZERO),
                "t": report.t,
                "recorded_at": now,
            }
        )
        batch.fills.append(report)
        _counter("fill", "applied").inc()
        batch.updates.append(
            (
                account_id,
                TradeUpdate(
                    event="fill" if done else "partial_fill",
                    order=self._views.view(order),
                    timestamp=report.t,
                    price=price,
                    qty=qty,
                    execution_id=report.exec_id,
                    position_qty=pos.qty,
                ),
            )
        )

    def _clear_replace(self, batch: _Batch, order: dict[str, Any]) -> None:
        """A replacement that died releases the order it was to replace."""
        old_id = order.get("replaces")
        if old_id is None:
            return
        batch.unreplace.add(old_id)
        old = batch.orders.get(old_id)
        if old is not None and old["replaced_by"] == order["id"]:
            old["replaced_by"] = None

    def _writes(self, conn: psycopg.AsyncConnection[dict[str, Any]], batch: _Batch) -> list[bytes]:
        """The statements that write every row the batch changed (sent with the COMMIT behind them)."""
        if not (batch.new_execs or batch.dirty_orders or batch.dirty_positions or batch.unreplace):
            return []
        positions = [
            {"account_id": k[0], "symbol": k[1], "qty": p.qty, "cost": p.cost, "realized_pl": p.realized_pl}
            for k in sorted(batch.dirty_positions)
            for p in (batch.positions[k],)
        ]
        orders = [
            {"id": oid, **{c: row[c] for c in _ORDER_COLUMNS}}
            for oid in sorted(batch.dirty_orders)
            for row in (batch.orders[oid],)
        ]
        account_ids = sorted(set(batch.cash) | set(batch.fees))
        accounts = [
            {
                "id": a,
                "cash": batch.cash.get(a, ZERO),
                "fees": batch.fees.get(a, ZERO),
                "realized": batch.realized.get(a, ZERO),
            }
            for a in account_ids
        ]
        writes = [
            WRITE(
                prepared.text(conn, codec.encode(batch.new_execs)),
                prepared.text(conn, codec.encode(positions)),
                prepared.text(conn, codec.encode(orders)),
                prepared.text(conn, codec.encode(accounts)),
                prepared.text(conn, batch.now.isoformat()),
                prepared.integer(len(batch.new_execs)),
                prepared.integer(len(orders)),
                prepared.uuids(batch.dirty_orders),
                prepared.uuids(account_ids),
            )
        ]
        if batch.unreplace:
            writes.append(UNREPLACE(prepared.uuids(batch.unreplace)))
        return writes


class LedgerProcess:
    """The ledger consumer in its own process: its own interpreter and GIL, on the other core.

    On a thread of the HTTP process, every fill batch held the GIL that the submit path needs, and
    every GIL hand-over after an I/O wait could cost the submit path milliseconds (the convoy effect).
    The child owns its NATS connection and Postgres connection (nothing is shared but two flags); it
    stops when asked (`stop`), on SIGTERM, or when the broker process dies (Linux parent-death signal,
    and a check of the parent's pid). A stop mid-batch loses nothing: reports are acked after commit."""

    def __init__(self, settings: BrokerSettings, durable: str = DURABLE) -> None:
        mp = multiprocessing.get_context("spawn")
        # Shared memory only (no semaphores: nothing for the resource tracker to find leaked at exit).
        self._ready = mp.RawValue(ctypes.c_byte, 0)
        self._stopping = mp.RawValue(ctypes.c_byte, 0)
        #: The child's latest metrics, served by this process's /metrics.
        self._metrics = _Snapshot(mp)
        _relay_metrics(self._metrics)
        self._proc = mp.Process(
            target=_ledger_main,
            args=(settings, durable, self._ready, self._stopping, os.getpid(), self._metrics),
            name="broker-ledger",
            daemon=True,
        )

    def start(self) -> None:
        self._proc.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.value = 1
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(2.0)

    def alive(self) -> bool:
        return self._proc.is_alive()

    @property
    def ready(self) -> bool:
        return bool(self._ready.value)


def _ledger_main(
    settings: BrokerSettings, durable: str, ready: Any, stopping: Any, parent_pid: int, metrics: _Snapshot
) -> None:
    """The ledger process: consume until the broker asks it to stop or goes away."""
    die_with_parent()  # the kernel stops the ledger when the broker process dies
    # First, so that every thread started later is a batch worker too.
    batch = settings.ledger_sched_batch and batch_scheduling()
    configure_logging("broker", settings.log_level, settings.log_format)
    if settings.ledger_sched_batch and not batch:
        _log.warning("ledger process not set to SCHED_BATCH (not supported or refused here)")
    consumer = LedgerConsumer(settings, durable)
    settle_heap()  # as the services do once started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the broker stops us
    signal.signal(signal.SIGTERM, lambda *_: consumer.stopping.set())

    async def watch() -> None:
        sent = 0.0
        while not consumer.stopping.is_set():
            if stopping.value or os.getppid() != parent_pid:
                consumer.stopping.set()
            ready.value = 1 if consumer.ready else 0
            if time.monotonic() - sent > METRICS_EVERY:
                _send_metrics(metrics)
                sent = time.monotonic()
            await asyncio.sleep(0.05)
        ready.value = 0
        _send_metrics(metrics)

    async def main() -> None:
        watcher = asyncio.create_task(watch())
        try:
            await consumer.run()
        finally:
            watcher.cancel()

    try:
        uvloop.run(main())
    except Exception as exc:  # never silent
        _log.error("ledger process crashed", error=repr(exc), exc_info=exc)
        raise


class _Snapshot:
    """One pickled snapshot in shared memory, written by one process and read by another. A sequence
    number instead of a lock: odd while a write is under way; a read that saw it change is dropped."""

    SIZE = 1 << 18

    def __init__(self, mp: Any) -> None:
        self.seq = mp.RawValue(ctypes.c_uint64, 0)
        self.size = mp.RawValue(ctypes.c_uint32, 0)
        self.data = mp.RawArray(ctypes.c_char, self.SIZE)

    def write(self, payload: bytes) -> None:
        if len(payload) > self.SIZE:
            return
        self.seq.value += 1
        self.data[: len(payload)] = payload
        self.size.value = len(payload)
        self.seq.value += 1

    def read(self) -> bytes | None:
        before = self.seq.value
        if before == 0 or before % 2:
            return None
        payload: bytes = self.data[: self.size.value]
        return payload if self.seq.value == before else None


class _RelayedMetrics(Collector):
    """In the broker process: the ledger process's metrics as it last wrote them."""

    def __init__(self) -> None:
        self.source: _Snapshot | None = None
        self.latest: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        payload = self.source.read() if self.source is not None else None
        if payload is not None:
            with contextlib.suppress(Exception):
                self.latest = pickle.loads(payload)
        return list(self.latest)


_relay: _RelayedMetrics | None = None


def _relay_metrics(source: _Snapshot) -> None:
    """Serve the ledger metrics from `source` (the child's snapshots) instead of this process's own."""
    global _relay
    if _relay is None:
        for collector in (REPORTS, BATCH_SECONDS, FILL_TO_COMMIT):
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(collector)
        _relay = _RelayedMetrics()
        REGISTRY.register(_relay)
    _relay.source = source
    _relay.latest = []


def _send_metrics(sink: _Snapshot) -> None:
    """In the ledger process: replace the snapshot in `sink` with a fresh one."""
    sink.write(pickle.dumps([m for c in (REPORTS, BATCH_SECONDS, FILL_TO_COMMIT) for m in c.collect()]))


#: An account without a commission model, and a symbol without a position.
_NO_COMMISSION = CommissionModel.parse(None)
_FLAT = PositionState()


@cache
def _counter(kind: str, outcome: str) -> Any:
    """The `REPORTS` child of one label pair (looked up once)."""
    return REPORTS.labels(kind, outcome)


def _stream_seq(msg: Msg) -> int:
    """`msg`'s sequence in the EX_EXEC stream (0 if it cannot tell)."""
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:
        return 0


def _deliveries(msg: Msg) -> int:
    """How many times JetStream has delivered `msg` (1 if it cannot tell)."""
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


@lru_cache(maxsize=65_536)
def _event_subject(account_id: UUID) -> str:
    return subjects.broker_event(account_id)
