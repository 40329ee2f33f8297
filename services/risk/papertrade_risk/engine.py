"""The risk service's hot path: answer `risk.check` with the pure rules on state kept in Redis.

A check decides with `papertrade.risk.check` on the account state this replica caches (limits,
positions, open orders, and the state's version) and the marks it caches (last trade, else the
1-minute bar close; pushed by `ex.trade.>`, re-read from Redis in the background after `MARK_TTL`).
One Lua item then commits the decision atomically (`papertrade_risk.store`): an approval reserves
the order's open exposure if the version is unchanged, the kill switches are off and a rate token
is left; a reject is confirmed if the version is unchanged. Orders of one account decided while
earlier ones are in flight build on their speculative state (each write names the version it
expects), so a burst costs one round trip. When a write finds another version (another replica, or
an execution report, wrote first) the account's pending orders wait until its in-flight items are
answered, then are decided again on the state Redis returned. Replicas therefore never both approve
orders that together break a limit.

Fails closed: when Redis does not answer, every order is rejected with a reason that says so.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
import orjson
import structlog
from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from papertrade import codec
from papertrade.accounts import LIQUIDITY_ACCOUNT_ID
from papertrade.enums import ExecType, Side
from papertrade.errors import ValidationError
from papertrade.messages import CancelCmd, ExecReport, RiskCheckRequest, RiskDecision, TradePrint
from papertrade.money import fmt
from papertrade.risk import AccountRiskState, Limits, check, reject, reserve_for
from papertrade.risk.state import day_to_json, state_from_redis
from papertrade_risk.store import LuaBatcher, seen_key
from papertrade_risk.tables import limits_table

_log = structlog.get_logger("risk")

DECISIONS = Counter("papertrade_risk_decisions_total", "Risk decisions", ["decision", "rule"])
CONFLICTS = Counter("papertrade_risk_conflicts_total", "Writes that found another state version")
_DECISION_CHILDREN: dict[tuple[str, str], Any] = {}

#: seconds a mark read from Redis is used before it is re-read (in the background)
MARK_TTL = 1.0
#: a check re-decided this many times on conflicting writes is refused
MAX_ATTEMPTS = 50

Reply = Callable[[bytes], Awaitable[None]]


@dataclass(slots=True)
class CachedAccount:
    state: AccountRiskState
    limits: Limits
    version: str


@dataclass(slots=True)
class _Slot:
    """One account as this replica sees it."""

    cached: CachedAccount | None = None
    #: items sent to Redis and not answered yet
    inflight: int = 0
    #: a state load is in flight
    loading: bool = False
    #: the cached state is known wrong (a write was refused); `fresh` may hold what Redis returned
    broken: bool = False
    fresh: dict[str, Any] | None = None
    #: jobs waiting for a usable state, in arrival order
    waiting: list[_Job] = field(default_factory=list)


class _Job:
    """A check (`req`, `reply`) or an execution report to apply (`report`, `future`)."""

    __slots__ = ("account", "attempts", "future", "reply", "report", "req")

    def __init__(
        self,
        req: RiskCheckRequest | None = None,
        reply: Reply | None = None,
        report: ExecReport | None = None,
        future: asyncio.Future[str] | None = None,
    ) -> None:
        self.req = req
        self.reply = reply
        self.report = report
        self.future = future
        self.attempts = 0
        source = req if req is not None else report
        assert source is not None
        self.account = str(source.account_id)


class RiskChecker:
    """One replica's risk checker: caches, the batcher, the decision flow, the audit buffer."""

    def __init__(self, batcher: LuaBatcher, engine: AsyncEngine, replica: str | None = None) -> None:
        self.batcher = batcher
        self.db = engine
        self.replica = replica or f"{os.getpid()}"
        self.slots: dict[str, _Slot] = {}
        self.marks: dict[str, Decimal] = {}
        self._mark_at: dict[str, float] = {}
        self._marks_waiting: dict[str, list[_Job]] = {}
        self._marks_refreshing: set[str] = set()
        self._limits_cache: dict[bytes, Limits] = {}
        self._tokens = itertools.count(1)
        self._token_prefix = f"{self.replica}-{time.time_ns():x}-"
        self._background: set[asyncio.Task[None]] = set()
        #: decisions not handed to the audit writer yet: (account id, record JSON)
        self.audit: list[tuple[str, bytes]] = []

    # --- entry points ------------------------------------------------------------------------------

    def start(self, req: RiskCheckRequest, reply: Reply) -> None:
        """Begin deciding `req`; `await reply(bytes)` is called with the encoded decision."""
        self._step(_Job(req=req, reply=reply))

    def on_trade(self, data: bytes) -> None:
        """A public trade print (`ex.trade.<symbol>`): the freshest mark of its symbol."""
        try:
            print_ = codec.decode(data, TradePrint)
        except ValidationError:
            return
        self.marks[print_.symbol] = print_.price
        self._mark_at[print_.symbol] = time.monotonic()

    async def apply_exec(self, report: ExecReport) -> str:
        """Apply one execution report to the account's state in Redis: `applied`, `dup` or `noop`."""
        if report.account_id == LIQUIDITY_ACCOUNT_ID:
            return "noop"
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._step(_Job(report=report, future=future))
        return await future

    async def release(self, cmd: CancelCmd) -> str:
        """Drop the open exposure of an approved order that never reached the book."""
        report = ExecReport(
            exec=ExecType.REJECTED,
            seq=-1,
            order_id=cmd.order_id,
            account_id=cmd.account_id,
            symbol=cmd.symbol,
            side=Side.BUY,
            t=cmd.t,
            reason=cmd.reason,
        )
        return await self.apply_exec(report)

    async def snapshot(self, account: str) -> CachedAccount | None:
        """The account's current state, read from Redis now (limits loaded from Postgres if needed)."""
        for _ in range(3):
            result = await self.batcher.call(orjson.dumps({"op": "s", "a": account}))
            acct = self._parse(result[1])
            if acct is not None:
                return acct
            await self._ensure_limits(account)
        return None

    async def set_limits(self, account: str, limits: Limits, *, only_if_absent: bool = False) -> None:
        """Write the account's limits to Redis and move its version (every replica re-reads them)."""
        item = {
            "op": "l",
            "a": account,
            "lim": limits.model_dump_json(),
            "nv": self._token(),
            "nx": only_if_absent,
        }
        await self.batcher.call(orjson.dumps(item))

    async def load_limits(self, account: str) -> Limits:
        """The account's limits from Postgres (the durable copy); no row means no limits."""
        async with self.db.connect() as conn:
            row = (
                await conn.execute(
                    select(limits_table.c.limits).where(limits_table.c.account_id == UUID(account))
                )
            ).first()
        return Limits.model_validate(row[0]) if row is not None else Limits()

    def take_audit(self) -> list[tuple[str, bytes]]:
        """The decisions recorded since the last call, encoded: (account id, record JSON)."""
        records, self.audit = self.audit, []
        return records

    # --- the flow ----------------------------------------------------------------------------------

    def _step(self, job: _Job) -> None:
        job.attempts += 1
        account = job.account
        slot = self.slots.get(account)
        if slot is None:
            slot = self.slots[account] = _Slot()
        if job.attempts > MAX_ATTEMPTS:
            self._spawn(
                self._fail(job, reject("risk_state", "risk state kept changing under this order; try again"))
            )
            return
        if slot.loading or slot.broken or slot.cached is None:
            slot.waiting.append(job)
            if slot.cached is None and not slot.loading and not slot.broken:
                self._load(account, slot)
            return
        if job.req is not None and not self._marks_ready(job, slot.cached):
            return
        if job.req is not None:
            self._decide(job, account, slot, slot.cached)
        else:
            self._apply(job, account, slot, slot.cached)

    def _decide(self, job: _Job, account: str, slot: _Slot, acct: CachedAccount) -> None:
        req = job.req
        assert req is not None
        decision = check(req, acct.limits, acct.state, self.marks)
        if decision.decision == "reject":
            self._send(slot, {"op": "v", "a": account, "v": acct.version}, job, account, decision)
            return
        expected, token = acct.version, self._token()
        reserve_for(acct.state, req, decision, self.marks)
        acct.version = token
        oid = str(req.order_id)
        opened = acct.state.open_orders.get(oid)
        rate = acct.limits.max_orders_per_second
        item = {
            "op": "c",
            "a": account,
            "v": expected,
            "nv": token,
            "oid": oid,
            "o": opened.to_json().decode() if opened is not None else "",
            "rep": str(req.replaces) if req.replaces is not None else "",
            "rate": str(rate) if rate is not None else "0",
        }
        self._send(slot, item, job, account, decision)

    def _apply(self, job: _Job, account: str, slot: _Slot, acct: CachedAccount) -> None:
        report = job.report
        assert report is not None and job.future is not None
        effect = acct.state.apply_exec(report)
        if effect.empty:
            if not job.future.done():
                job.future.set_result("noop")
            return
        expected, token = acct.version, self._token()
        acct.version = token
        pos_symbol, pos_json = "", ""
        if effect.position is not None:
            pos_symbol = effect.position[0]
            pos_json = effect.position[1].to_json().decode() if effect.position[1] is not None else ""
        orders: list[str] = []
        for oid, order in effect.orders:
            orders += [oid, order.to_json().decode() if order is not None else ""]
        item = {
            "op": "a",
            "a": account,
            "v": expected,
            "nv": token,
            "dk": seen_key(report.symbol, report.seq) if report.seq >= 0 else "",
            "ps": pos_symbol,
            "p": pos_json,
            "ord": orders,
            "day": day_to_json(*effect.day).decode() if effect.day is not None else "",
        }
        self._send(slot, item, job, account, None)

    def _send(
        self, slot: _Slot, item: dict[str, Any], job: _Job, account: str, decision: RiskDecision | None
    ) -> None:
        slot.inflight += 1
        rate = slot.cached.limits.max_orders_per_second if slot.cached is not None else None

        async def cont(result: Any) -> None:
            slot.inflight -= 1
            if isinstance(result, BaseException):
                slot.broken, slot.fresh = True, None
                await self._fail(job, _unavailable(result))
            else:
                status = result[0]
                if status == "ok":
                    await self._succeed(job, decision)
                elif status == "conflict":
                    CONFLICTS.inc()
                    slot.broken, slot.fresh = True, result[1]
                    slot.waiting.append(job)
                elif status == "dup":
                    slot.broken, slot.fresh = True, None
                    self._resolve(job, "dup")
                elif status == "killed":
                    slot.broken = True
                    await self._fail(job, reject("kill_switch", str(result[1])))
                elif status == "throttled":
                    slot.broken = True
                    await self._fail(
                        job,
                        reject(
                            "max_orders_per_second",
                            f"max_orders_per_second {fmt(rate)} exceeded",
                            throttled=True,
                        ),
                    )
                else:
                    slot.broken = True
                    await self._fail(job, reject("risk_state", f"risk state error: {result!r}"))
            if slot.inflight == 0 and slot.broken:
                self._recover(account, slot)

        self.batcher.submit(orjson.dumps(item), cont)

    def _recover(self, account: str, slot: _Slot) -> None:
        """Every in-flight item is answered: take the state Redis returned last, or load it."""
        fresh, slot.fresh = slot.fresh, None
        slot.broken = False
        acct = self._parse(fresh) if fresh is not None else None
        if acct is None:
            slot.cached = None
            if slot.waiting:
                self._load(account, slot)
            return
        slot.cached = acct
        self._resume(slot)

    def _load(self, account: str, slot: _Slot) -> None:
        slot.loading = True
        slot.cached = None

        async def cont(result: Any) -> None:
            slot.loading = False
            if isinstance(result, BaseException):
                waiting, slot.waiting = slot.waiting, []
                for job in waiting:
                    await self._fail(job, _unavailable(result))
                return
            acct = self._parse(result[1])
            if acct is None:
                slot.loading = True  # limits come from Postgres first (not from inside the batch loop)
                self._spawn(self._load_limits_then_reload(account, slot))
                return
            slot.cached = acct
            self._resume(slot)

        self.batcher.submit(orjson.dumps({"op": "s", "a": account}), cont)

    async def _load_limits_then_reload(self, account: str, slot: _Slot) -> None:
        try:
            await self._ensure_limits(account)
        except Exception as exc:
            slot.loading = False
            waiting, slot.waiting = slot.waiting, []
            for job in waiting:
                await self._fail(job, _unavailable(exc))
            return
        slot.loading = False
        self._load(account, slot)

    async def _ensure_limits(self, account: str) -> None:
        limits = await self.load_limits(account)
        await self.set_limits(account, limits, only_if_absent=True)

    def _resume(self, slot: _Slot) -> None:
        waiting, slot.waiting = slot.waiting, []
        for job in waiting:
            self._step(job)

    # --- marks -------------------------------------------------------------------------------------

    def _marks_ready(self, job: _Job, acct: CachedAccount) -> bool:
        """True if every mark the check needs was read once; stale ones are refreshed in the background."""
        req = job.req
        assert req is not None
        now = time.monotonic()
        missing: list[str] = []
        stale: list[str] = []
        for symbol in _symbols(req.symbol, acct):
            at = self._mark_at.get(symbol)
            if at is None:
                missing.append(symbol)
            elif now - at > MARK_TTL and symbol not in self._marks_refreshing:
                stale.append(symbol)
        if stale:
            self._refresh_marks(stale, None)
        if missing:
            self._refresh_marks(missing, job)
            return False
        return True

    def _refresh_marks(self, symbols: list[str], job: _Job | None) -> None:
        ask = [s for s in symbols if s not in self._marks_refreshing]
        if job is not None:
            # the job waits for the last of its symbols
            self._marks_waiting.setdefault(symbols[-1], []).append(job)
            if symbols[-1] in self._marks_refreshing and not ask:
                return
        if not ask:
            return
        self._marks_refreshing.update(ask)

        async def cont(result: Any) -> None:
            now = time.monotonic()
            waiting: list[_Job] = []
            if isinstance(result, BaseException):
                for s in ask:
                    self._marks_refreshing.discard(s)
                    for job in self._marks_waiting.pop(s, []):
                        await self._fail(job, _unavailable(result))
                return
            values = result[1] if isinstance(result[1], list) else []
            for i, symbol in enumerate(ask):
                self._marks_refreshing.discard(symbol)
                price = _mark_from(values[2 * i], values[2 * i + 1]) if 2 * i + 1 < len(values) else None
                if price is not None:
                    self.marks[symbol] = price
                else:
                    self.marks.pop(symbol, None)
                self._mark_at[symbol] = now
                waiting += self._marks_waiting.pop(symbol, [])
            for job in waiting:
                job.attempts -= 1  # waiting for a price is not a conflict
                self._step(job)

        self.batcher.submit(orjson.dumps({"op": "m", "a": "", "syms": ask}), cont)

    # --- outcomes ----------------------------------------------------------------------------------

    async def _succeed(self, job: _Job, decision: RiskDecision | None) -> None:
        if job.req is not None:
            assert decision is not None
            await self._finish(job, decision)
        else:
            self._resolve(job, "applied")

    async def _fail(self, job: _Job, decision: RiskDecision) -> None:
        if job.req is not None:
            await self._finish(job, decision)
        elif job.future is not None and not job.future.done():
            job.future.set_exception(RuntimeError(decision.reason or "risk state error"))

    def _resolve(self, job: _Job, outcome: str) -> None:
        if job.future is not None and not job.future.done():
            job.future.set_result(outcome)

    async def _finish(self, job: _Job, decision: RiskDecision) -> None:
        req, reply = job.req, job.reply
        assert req is not None and reply is not None
        try:
            await reply(codec.encode(decision))
        except Exception as exc:
            _log.warning("risk reply failed", error=repr(exc))
        # nats-py writes the reply from its flusher task, woken by the publish: the audit record
        # (written by the service in batches) and the metric are queued behind that write
        asyncio.get_running_loop().call_soon(self._record, job.account, req, decision)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- helpers -----------------------------------------------------------------------------------

    def _parse(self, snap: Any) -> CachedAccount | None:
        if not isinstance(snap, dict):
            return None
        raw_limits = snap.get("lim") or ""
        if not raw_limits:
            return None
        key = raw_limits.encode()
        limits = self._limits_cache.get(key)
        if limits is None:
            if len(self._limits_cache) > 10_000:
                self._limits_cache.clear()
            limits = self._limits_cache[key] = Limits.model_validate_json(key)
        state = state_from_redis(_pairs(snap.get("pos")), _pairs(snap.get("open")), snap.get("day") or None)
        return CachedAccount(state, limits, str(snap.get("v") or ""))

    def _token(self) -> str:
        return f"{self._token_prefix}{next(self._tokens)}"

    def _record(self, account: str, req: RiskCheckRequest, decision: RiskDecision) -> None:
        # encoded here, after the reply, a few microseconds each: the writer's flush then holds
        # the loop only for the Redis call, not for encoding hundreds of records at once
        record = AuditRecord(at=time.time(), replica=self.replica, request=req, decision=decision)
        self.audit.append((account, codec.encode(record)))
        _decision_counter(decision.decision, decision.rule or "").inc()


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One decision as the audit keeps it (encoded after the reply)."""

    at: float
    replica: str
    request: RiskCheckRequest
    decision: RiskDecision

    def flat(self) -> dict[str, Any]:
        """The shape `GET /v1/decisions` answers."""
        req, d = self.request, self.decision
        return {
            "at": datetime.fromtimestamp(self.at, UTC).isoformat().replace("+00:00", "Z"),
            "t": req.t.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "order_id": str(req.order_id),
            "account_id": str(req.account_id),
            "symbol": req.symbol,
            "side": req.side.value,
            "type": req.type.value,
            "qty": fmt(req.qty),
            "notional": fmt(req.notional),
            "limit_price": fmt(req.limit_price),
            "stop_price": fmt(req.stop_price),
            "replaces": str(req.replaces) if req.replaces is not None else None,
            "decision": d.decision,
            "new_qty": fmt(d.qty),
            "new_notional": fmt(d.notional),
            "rule": d.rule,
            "reason": d.reason,
            "throttled": d.throttled,
            "replica": self.replica,
        }


def _decision_counter(decision: str, rule: str) -> Any:
    """The labelled child of `DECISIONS` (`labels()` takes a lock and builds a key on every call)."""
    key = (decision, rule)
    child = _DECISION_CHILDREN.get(key)
    if child is None:
        child = _DECISION_CHILDREN[key] = DECISIONS.labels(decision, rule)
    return child


def _symbols(symbol: str, acct: CachedAccount) -> Iterable[str]:
    yield symbol
    for s in acct.state.positions:
        if s != symbol:
            yield s
    for s in acct.state.open_symbols():
        if s != symbol and s not in acct.state.positions:
            yield s


def _pairs(flat: Any) -> dict[str, str]:
    if not isinstance(flat, list):
        return {}
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _mark_from(last: str, bar: str) -> Decimal | None:
    for raw, key in ((last, "price"), (bar, "c")):
        if raw:
            try:
                value = orjson.loads(raw).get(key)
                if value is not None:
                    price = Decimal(str(value))
                    if price.is_finite() and price > 0:
                        return price
            except (orjson.JSONDecodeError, ArithmeticError, AttributeError):
                continue
    return None


def _unavailable(exc: BaseException) -> RiskDecision:
    detail = str(exc) or type(exc).__name__
    return reject("risk_unavailable", f"risk state unavailable (Redis unreachable: {detail}); order refused")
