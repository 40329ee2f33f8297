"""The ledger consumer: execution reports from JetStream (EX_EXEC) into Postgres, then trade updates.

A durable pull consumer fetches reports in batches; one batch is applied in one transaction (orders
locked, executions inserted with their unique id, positions, cash and fees), and every message of the
batch is acked only after the commit. A redelivered report finds its execution row (fills) or its
order already past that state (everything else) and changes nothing. Reports of accounts the broker
does not keep (the liquidity agent's) are acked and skipped.
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
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
import structlog
import uvloop
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import FetchTimeoutError
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from psycopg.rows import dict_row

from papertrade import codec
from papertrade.bus import subjects
from papertrade.bus.connect import connect_nats
from papertrade.bus.streams import exec_consumer
from papertrade.enums import ExecType, OrderStatus, Side
from papertrade.errors import ValidationError
from papertrade.ledger import CommissionModel, PositionState, apply_fill, cash_delta
from papertrade.messages import ExecReport, TradeUpdate
from papertrade.money import ZERO
from papertrade.service.logs import configure_logging
from papertrade.stack.procs import die_with_parent
from papertrade.timeutil import utcnow
from papertrade_broker.hotpath import libpq_url
from papertrade_broker.settings import BrokerSettings
from papertrade_broker.views import order_view

_log = structlog.get_logger("papertrade_broker.ledger")

DURABLE = "broker-ledger"
BATCH = 256
#: How long the second fetch of a batch waits when nothing more is there (seconds).
DRAIN_WAIT = 0.005
#: How often the ledger process sends its metrics to the broker process (seconds).
METRICS_EVERY = 1.0

#: The batch's orders, locked in id order (two batches never deadlock).
LOCK_ORDERS = "SELECT * FROM orders WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE"
SEEN_EXECS = """
SELECT exec_id, order_id FROM executions
WHERE (exec_id, order_id) IN (SELECT * FROM unnest(%(e)s::text[], %(o)s::uuid[]))
"""
LOCK_POSITIONS = """
SELECT * FROM positions
WHERE (account_id, symbol) IN (SELECT * FROM unnest(%(a)s::uuid[], %(s)s::text[]))
ORDER BY account_id, symbol FOR UPDATE
"""
COMMISSIONS = "SELECT id, commission FROM accounts WHERE id = ANY(%(a)s)"
_EXEC_COLUMNS = (
    "exec_id",
    "order_id",
    "account_id",
    "symbol",
    "side",
    "qty",
    "price",
    "fee",
    "liquidity",
    "cum_qty",
    "leaves_qty",
    "t",
    "recorded_at",
)
INSERT_EXECUTION = (
    f"INSERT INTO executions ({', '.join(_EXEC_COLUMNS)}) "
    f"VALUES ({', '.join(f'%({c})s' for c in _EXEC_COLUMNS)}) ON CONFLICT DO NOTHING"
)
UPSERT_POSITION = """
INSERT INTO positions (account_id, symbol, qty, cost, realized_pl, updated_at)
VALUES (%(account_id)s, %(symbol)s, %(qty)s, %(cost)s, %(realized_pl)s, %(updated_at)s)
ON CONFLICT (account_id, symbol) DO UPDATE SET qty = EXCLUDED.qty, cost = EXCLUDED.cost,
  realized_pl = EXCLUDED.realized_pl, updated_at = EXCLUDED.updated_at
"""
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
UPDATE_ORDER = f"UPDATE orders SET {', '.join(f'{c} = %({c})s' for c in _ORDER_COLUMNS)} WHERE id = %(id)s"
UNREPLACE = "UPDATE orders SET replaced_by = NULL WHERE id = ANY(%(ids)s) AND status <> 'replaced'"
UPDATE_ACCOUNT = """
UPDATE accounts SET cash = cash + %(cash)s, fees = fees + %(fees)s, realized_pl = realized_pl + %(realized)s
WHERE id = %(id)s
"""

REPORTS = Counter("papertrade_broker_exec_reports_total", "Execution reports consumed", ["exec", "outcome"])
BATCH_SECONDS = Histogram(
    "papertrade_broker_ledger_batch_seconds",
    "Time to apply and commit one batch of execution reports",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
FILL_TO_COMMIT = Histogram(
    "papertrade_broker_fill_to_commit_seconds",
    "From a fill report's time to its ledger commit",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)

_EVENT_OF = {
    ExecType.ACCEPTED: "new",
    ExecType.CANCELED: "canceled",
    ExecType.EXPIRED: "expired",
    ExecType.REJECTED: "rejected",
    ExecType.REPLACED: "replaced",
}


@dataclass
class _Batch:
    """The state one batch works on: locked orders, positions, account deltas, rows to write."""

    orders: dict[UUID, dict[str, Any]]
    positions: dict[tuple[UUID, str], PositionState] = field(default_factory=dict)
    seen_execs: set[tuple[str, UUID]] = field(default_factory=set)
    new_execs: list[dict[str, Any]] = field(default_factory=list)
    dirty_orders: set[UUID] = field(default_factory=set)
    dirty_positions: set[tuple[UUID, str]] = field(default_factory=set)
    cash: dict[UUID, Decimal] = field(default_factory=dict)
    fees: dict[UUID, Decimal] = field(default_factory=dict)
    realized: dict[UUID, Decimal] = field(default_factory=dict)
    updates: list[tuple[UUID, TradeUpdate]] = field(default_factory=list)
    fill_times: list[float] = field(default_factory=list)
    unreplace: set[UUID] = field(default_factory=set)


@dataclass
class _FillState:
    """The reads a batch's fills need, sent and not read yet."""

    asked: set[tuple[UUID, str]]
    seen: psycopg.AsyncCursor[dict[str, Any]]
    held: psycopg.AsyncCursor[dict[str, Any]]
    models: psycopg.AsyncCursor[dict[str, Any]] | None


class LedgerConsumer:
    """Books execution reports. `run()` owns its NATS connection and Postgres pool, so it can run on
    its own process (`LedgerProcess`), apart from the HTTP handlers."""

    def __init__(self, settings: BrokerSettings, durable: str = DURABLE) -> None:
        self.settings = settings
        self.durable = durable
        self.applied = 0
        self.ready = False
        self.stopping = threading.Event()
        self._db: psycopg.AsyncConnection[dict[str, Any]] | None = None
        self._nc: NATS | None = None
        self._commissions: dict[UUID, CommissionModel] = {}

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

    async def _consume(self) -> None:
        if self._nc is None or self._nc.is_closed:
            self._nc = await connect_nats(self.settings.nats_url, "broker-ledger")
        sub = await exec_consumer(self._nc.jetstream(), self.durable)
        self.ready = True
        ahead: asyncio.Task[list[Msg]] | None = None
        try:
            while not self.stopping.is_set():
                msgs = await (ahead or _fetch(sub))
                ahead = None
                if not msgs:
                    continue
                # The next batch is fetched while this one is booked (batches are still applied one
                # after the other, in order).
                ahead = asyncio.create_task(_fetch(sub))
                await self.handle(msgs)
        finally:
            self.ready = False
            if ahead is not None:
                # Fetched, not booked: handed back for redelivery (unacked, they would come back anyway).
                ahead.cancel()
                await asyncio.wait([ahead])
                if not ahead.cancelled() and ahead.exception() is None:
                    for msg in ahead.result():
                        with contextlib.suppress(Exception):
                            await msg.nak()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def handle(self, msgs: Sequence[Msg]) -> None:
        """Apply a batch in one transaction, then ack; on a failure, retry message by message."""
        reports: list[tuple[Msg, ExecReport | None]] = []
        for msg in msgs:
            try:
                reports.append((msg, codec.decode(msg.data, ExecReport)))
            except ValidationError as exc:
                _log.error("unreadable execution report skipped", subject=msg.subject, error=str(exc))
                REPORTS.labels("unknown", "unreadable").inc()
                reports.append((msg, None))
        valid = [r for _, r in reports if r is not None]
        try:
            batch = await self._apply(valid)
        except Exception as exc:
            _log.warning("batch failed, applying one by one", error=repr(exc), size=len(valid))
            for msg, report in reports:
                if report is not None:
                    try:
                        one = await self._apply([report])
                    except Exception as exc2:
                        _log.error("execution report failed; it will be redelivered", error=repr(exc2))
                        await msg.nak(delay=1.0)
                        continue
                    await self._after_commit(one)
                await msg.ack()
            return
        await self._after_commit(batch)
        for msg, _ in reports:
            await msg.ack()

    async def _after_commit(self, batch: _Batch) -> None:
        now = time.time()
        for t in batch.fill_times:
            FILL_TO_COMMIT.observe(max(now - t, 0.0))
        nc = self._nc
        assert nc is not None
        for account_id, upd in batch.updates:
            await nc.publish(subjects.broker_event(account_id), codec.encode(upd))

    async def _apply(self, reports: Sequence[ExecReport]) -> _Batch:
        start = time.perf_counter()
        ids = {r.order_id for r in reports} | {r.new_order_id for r in reports if r.new_order_id}
        if not reports:
            return _Batch(orders={})
        conn = await self._connection()
        # One pipeline around the transaction: the locking reads go out together (one round trip),
        # the writes and the COMMIT together (a second one).
        async with conn.pipeline(), conn.transaction():
            c_orders = await conn.execute(LOCK_ORDERS, {"ids": sorted(ids)}, prepare=True)
            # The fill state is asked for in the same round trip, keyed by the reports' accounts (an
            # order's own account is checked once its row is here).
            reported = [r for r in reports if r.exec is ExecType.FILL and r.exec_id]
            state = (
                await self._ask_fill_state(conn, reported, {(f.account_id, f.symbol) for f in reported})
                if reported
                else None
            )
            batch = _Batch(orders={r["id"]: r for r in await c_orders.fetchall()})
            more = (
                {
                    batch.orders[r.order_id]["replaced_by"]
                    for r in reports
                    if r.exec is ExecType.REJECTED and r.command == "replace" and r.order_id in batch.orders
                }
                - {None}
                - set(batch.orders)
            )
            if more:
                extra = await (
                    await conn.execute(LOCK_ORDERS, {"ids": sorted(more)}, prepare=True)
                ).fetchall()
                batch.orders.update({r["id"]: r for r in extra})
            fills = [r for r in reported if r.order_id in batch.orders]
            if state is not None:
                await self._read_fill_state(batch, state)
                missing = {(batch.orders[f.order_id]["account_id"], f.symbol) for f in fills} - state.asked
                if missing:  # a report that named another account than its order's
                    await self._read_fill_state(batch, await self._ask_fill_state(conn, fills, missing))
            for report in reports:
                order = batch.orders.get(report.order_id)
                if order is None:
                    REPORTS.labels(report.exec.value, "skipped").inc()
                    continue
                self._apply_one(batch, report, order)
            await self._write(conn, batch)
        BATCH_SECONDS.observe(time.perf_counter() - start)
        self.applied += len(reports)
        return batch

    async def _connection(self) -> psycopg.AsyncConnection[dict[str, Any]]:
        """The ledger's own Postgres connection (plain psycopg, prepared statements), reopened if lost."""
        if self._db is None or self._db.closed or self._db.broken:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    await self._db.close()
            self._db = await psycopg.AsyncConnection.connect(
                libpq_url(self.settings.database_url), row_factory=dict_row, autocommit=False
            )
        return self._db

    async def _ask_fill_state(
        self,
        conn: psycopg.AsyncConnection[dict[str, Any]],
        fills: Sequence[ExecReport],
        positions: set[tuple[UUID, str]],
    ) -> _FillState:
        """Send (pipeline) the reads fills need: executions already booked, the positions (locked),
        and the commission models of accounts not cached yet."""
        keys = sorted({(f.exec_id or "", f.order_id) for f in fills})
        pos_keys = sorted(positions)
        unknown = sorted({a for a, _ in pos_keys} - set(self._commissions))
        seen = await conn.execute(
            SEEN_EXECS, {"e": [k[0] for k in keys], "o": [k[1] for k in keys]}, prepare=True
        )
        held = await conn.execute(
            LOCK_POSITIONS, {"a": [k[0] for k in pos_keys], "s": [k[1] for k in pos_keys]}, prepare=True
        )
        models = await conn.execute(COMMISSIONS, {"a": unknown}, prepare=True) if unknown else None
        return _FillState(set(positions), seen, held, models)

    async def _read_fill_state(self, batch: _Batch, state: _FillState) -> None:
        batch.seen_execs |= {(r["exec_id"], r["order_id"]) for r in await state.seen.fetchall()}
        for r in await state.held.fetchall():
            batch.positions[(r["account_id"], r["symbol"])] = PositionState(
                r["qty"], r["cost"], r["realized_pl"]
            )
        for r in await state.models.fetchall() if state.models is not None else []:
            self._commissions[r["id"]] = CommissionModel.parse(r["commission"])

    def _apply_one(self, batch: _Batch, report: ExecReport, order: dict[str, Any]) -> None:
        status = OrderStatus(order["status"])
        now = utcnow()
        kind = report.exec
        if kind is ExecType.FILL:
            self._apply_fill(batch, report, order, now)
            return
        if kind is ExecType.ACCEPTED:
            if status not in (OrderStatus.PENDING_NEW, OrderStatus.ACCEPTED):
                REPORTS.labels(kind.value, "stale").inc()
                return
            order["status"] = OrderStatus.NEW.value
        elif kind in (ExecType.CANCELED, ExecType.EXPIRED):
            if status.is_final:
                REPORTS.labels(kind.value, "stale").inc()
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
                REPORTS.labels(kind.value, "stale").inc()
                return
            new["status"] = OrderStatus.REJECTED.value
            new["failed_at"] = report.t
            new["reserved"] = ZERO
            new["reason"] = report.reason
            new["updated_at"] = now
            batch.dirty_orders.add(new["id"])
            REPORTS.labels(kind.value, "applied").inc()
            batch.updates.append(
                (new["account_id"], TradeUpdate(event="rejected", order=order_view(new), timestamp=report.t))
            )
            return
        elif kind is ExecType.REJECTED and report.command == "cancel":
            if status is not OrderStatus.PENDING_CANCEL:
                REPORTS.labels(kind.value, "stale").inc()
                return
            order["status"] = (
                OrderStatus.PARTIALLY_FILLED.value if order["filled_qty"] > 0 else OrderStatus.NEW.value
            )
            order["updated_at"] = now
            batch.dirty_orders.add(order["id"])
            REPORTS.labels(kind.value, "applied").inc()
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
                REPORTS.labels(kind.value, "stale").inc()
                return
        elif kind is ExecType.REPLACED:
            if status.is_final:
                REPORTS.labels(kind.value, "stale").inc()
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
            REPORTS.labels(kind.value, "applied").inc()
            return
        else:
            return
        order["updated_at"] = now
        batch.dirty_orders.add(order["id"])
        REPORTS.labels(kind.value, "applied").inc()
        batch.updates.append(
            (
                order["account_id"],
                TradeUpdate(event=_EVENT_OF[kind], order=order_view(order), timestamp=report.t),
            )
        )

    def _apply_fill(self, batch: _Batch, report: ExecReport, order: dict[str, Any], now: Any) -> None:
        assert report.exec_id is not None
        key = (report.exec_id, report.order_id)
        if key in batch.seen_execs or report.qty is None or report.price is None or report.qty <= 0:
            REPORTS.labels("fill", "duplicate").inc()
            return
        batch.seen_execs.add(key)
        account_id: UUID = order["account_id"]
        side = Side(order["side"])
        qty, price = report.qty, report.price
        commission = self._commissions.get(account_id) or CommissionModel.parse(None)
        fee = commission.fill_fee(
            side,
            qty,
            price,
            prior_qty=order["filled_qty"],
            prior_notional=order["filled_notional"],
            prior_fee=order["fees"],
        )
        pkey = (account_id, order["symbol"])
        pos, realized = apply_fill(batch.positions.get(pkey, PositionState()), side, qty, price)
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
        batch.fill_times.append(report.t.timestamp())
        REPORTS.labels("fill", "applied").inc()
        batch.updates.append(
            (
                account_id,
                TradeUpdate(
                    event="fill" if done else "partial_fill",
                    order=order_view(order),
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

    async def _write(self, conn: psycopg.AsyncConnection[dict[str, Any]], batch: _Batch) -> None:
        """Every row the batch changed, in one pipeline (the COMMIT follows in the same round trip)."""
        now = utcnow()
        account_ids = sorted(set(batch.cash) | set(batch.fees))
        async with conn.pipeline():
            cur = conn.cursor()
            if batch.new_execs:
                await cur.executemany(INSERT_EXECUTION, batch.new_execs)
            if batch.dirty_positions:
                rows = [
                    {
                        "account_id": k[0],
                        "symbol": k[1],
                        "qty": batch.positions[k].qty,
                        "cost": batch.positions[k].cost,
                        "realized_pl": batch.positions[k].realized_pl,
                        "updated_at": now,
                    }
                    for k in sorted(batch.dirty_positions)
                ]
                await cur.executemany(UPSERT_POSITION, rows)
            if batch.dirty_orders:
                await cur.executemany(UPDATE_ORDER, [batch.orders[oid] for oid in sorted(batch.dirty_orders)])
            if batch.unreplace:
                await cur.execute(UNREPLACE, {"ids": sorted(batch.unreplace)}, prepare=True)
            if account_ids:
                await cur.executemany(
                    UPDATE_ACCOUNT,
                    [
                        {
                            "id": a,
                            "cash": batch.cash.get(a, ZERO),
                            "fees": batch.fees.get(a, ZERO),
                            "realized": batch.realized.get(a, ZERO),
                        }
                        for a in account_ids
                    ],
                )


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
    configure_logging("broker", settings.log_level, settings.log_format)
    consumer = LedgerConsumer(settings, durable)
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


async def _fetch(sub: Any) -> list[Msg]:
    """Wait for one report, then take what else is already there. (One `fetch(BATCH)` would linger
    until the batch is full or its timeout passes: idle-to-busy reports would wait.)"""
    try:
        msgs: list[Msg] = await sub.fetch(1, timeout=0.5)
    except (FetchTimeoutError, TimeoutError):
        return []
    with contextlib.suppress(FetchTimeoutError, TimeoutError):
        msgs += await sub.fetch(BATCH - 1, timeout=DRAIN_WAIT)
    return msgs


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
