"""The risk service's hot path: answer `risk.check` from memory, as the account's owner.

Each account's live state (limits, positions, open orders, the day's P&L, the order-rate bucket, the
account's kill switch) is owned by one replica at a time: Redis key `own:<account>` names it, with a
lease (`RISK_LEASE`, renewed every quarter lease) and a fence token (`papertrade_risk.store`). The
owner loaded the state from Redis when it took the lease; it decides with `papertrade.risk.check` in
memory and answers at once, then writes the changes behind (`RISK_FLUSH` later, one Lua call for all
dirty accounts). The script applies a write only while the lease still holds the writer's token, so
a replica that lost its lease can never write stale state.

A replica that receives a check for an account another live replica owns forwards it to that
replica's own subject (`risk.own.<replica>`) with the original reply subject, so the owner answers
the requester directly; if nobody owns the account, the receiver takes the lease. Execution reports
and releases are applied by the owner too, and acknowledged once their write reached Redis.

Fails closed: an owner decides only while its lease is certainly still its own (`lease * 3/4` after
the last renewal was sent) and while the service's Redis watch sees Redis; otherwise every order is
rejected with a reason that names Redis.
"""

from __future__ import annotations

import asyncio
import time
import uuid
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
from papertrade.bus import subjects
from papertrade.enums import ExecType, Side
from papertrade.errors import ValidationError
from papertrade.messages import CancelCmd, ExecReport, RiskCheckRequest, RiskDecision, TradePrint
from papertrade.money import fmt
from papertrade.risk import AccountRiskState, Limits, check, reject, reserve_for
from papertrade.risk.bucket import TokenBucket, take
from papertrade.risk.state import can_change, day_to_json, state_from_redis
from papertrade_risk.store import LuaBatcher, audit_item, seen_key, write_entry, write_item
from papertrade_risk.tables import limits_table

_log = structlog.get_logger("risk")

DECISIONS = Counter("papertrade_risk_decisions_total", "Risk decisions", ["decision", "rule"])
FORWARDED = Counter("papertrade_risk_forwarded_total", "Checks and reports forwarded to the owner")
LEASES_LOST = Counter("papertrade_risk_leases_lost_total", "Account leases lost (expired or fenced)")
_DECISION_CHILDREN: dict[tuple[str, str], Any] = {}
#: account ids as text (`_account_str`)
_ACCOUNT_TEXT: dict[UUID, str] = {}

#: seconds a mark read from Redis is used before it is re-read (in the background)
MARK_TTL = 1.0
#: a job routed more often than this (ownership moving under it) is refused
MAX_HOPS = 4
#: header of a forwarded message: how often it was forwarded already
HOPS_HEADER = "Pt-Risk-Hops"
#: header of a message on `risk.own.<replica>` that carries an execution report, not a check
OP_HEADER = "Pt-Risk-Op"
#: seconds a replica trusts what Redis said about another replica's lease before asking again
HINT_TTL = 0.5
#: seconds a forwarded report or array part waits for the owner's answer
FORWARD_TIMEOUT = 2.0
#: seconds without activity after which an owner hands an account's lease back
IDLE_RELEASE = 60.0
#: seconds between retries of a write-behind batch that failed (Redis unreachable)
RETRY_FLUSH = 0.05
#: seconds between refreshes of a rate bucket's expiry in Redis (it expires after an hour unused)
RATE_TTL_REFRESH = 600.0
#: decisions' audit records written per flush at most (more wait for the next flush)
AUDIT_PER_FLUSH = 1_000
#: audit records kept while Redis is unreachable (then the oldest are dropped)
AUDIT_BACKLOG = 100_000

Reply = Callable[[RiskDecision], Awaitable[None]]


@dataclass(slots=True)
class CachedAccount:
    """An account's state as read (from this replica's memory when it owns it, else from Redis)."""

    state: AccountRiskState
    limits: Limits


@dataclass(slots=True)
class _Slot:
    """One account as this replica sees it: owned here (token set), being acquired, or owned elsewhere."""

    #: `"<replica> <fence>"` while this replica holds the lease
    token: str | None = None
    #: monotonic time until which the lease is certainly still ours
    valid_until: float = 0.0
    state: AccountRiskState | None = None
    limits: Limits | None = None
    kill: str | None = None
    bucket: TokenBucket | None = None
    acquiring: bool = False
    #: lease taken, state being loaded
    loading: bool = False
    #: another replica's id and until when that is trusted (monotonic)
    owner: str | None = None
    owner_until: float = 0.0
    used: float = 0.0
    waiting: list[_Job] = field(default_factory=list)
    #: changes not written to Redis yet: order id / symbol -> JSON ('' = delete), day JSON, seen keys;
    #: an open order marked None is encoded from the state when the flush writes it
    w_open: dict[str, str | None] = field(default_factory=dict)
    w_pos: dict[str, str] = field(default_factory=dict)
    w_day: str = ""
    w_seen: list[str] = field(default_factory=list)
    w_rate: bool = False
    #: futures resolved once the changes above reached Redis
    w_waiters: list[asyncio.Future[str]] = field(default_factory=list)
    #: a write of this lease reached Redis (the account is in the `accounts` set)
    listed: bool = False
    #: monotonic time until which the rate bucket's expiry needs no refresh
    rate_ttl_until: float = 0.0
    #: `risk.ctl` changes that arrived while the state was being loaded
    ctl_limits: Limits | None = None
    ctl_kill: tuple[str | None] | None = None

    @property
    def dirty(self) -> bool:
        return bool(self.w_open or self.w_pos or self.w_day or self.w_seen or self.w_rate or self.w_waiters)


class _Job:
    """A check (`req`, `reply`, `reply_to`) or an execution report to apply (`report`, `future`)."""

    __slots__ = ("account", "attempts", "future", "hops", "reply", "reply_to", "report", "req")

    def __init__(
        self,
        req: RiskCheckRequest | None = None,
        reply: Reply | None = None,
        report: ExecReport | None = None,
        future: asyncio.Future[str] | None = None,
        reply_to: str | None = None,
        hops: int = 0,
    ) -> None:
        self.req = req
        self.reply = reply
        self.report = report
        self.future = future
        self.reply_to = reply_to
        self.hops = hops
        self.attempts = 0
        source = req if req is not None else report
        assert source is not None
        self.account = _account_str(source.account_id)


@dataclass(slots=True)
class _Written:
    """One account's changes in a write-behind batch, kept until Redis answered."""

    account: str
    slot: _Slot
    token: str
    changes: tuple[dict[str, str | None], dict[str, str], str, list[str], bool]
    waiters: list[asyncio.Future[str]]


class RiskChecker:
    """One replica's risk checker: owned accounts in memory, routing, write-behind, the audit buffer."""

    def __init__(
        self,
        batcher: LuaBatcher,
        engine: AsyncEngine,
        replica: str | None = None,
        *,
        lease: float = 2.0,
        flush: float = 0.005,
    ) -> None:
        self.batcher = batcher
        self.db = engine
        self.replica = replica or uuid.uuid4().hex[:12]
        self.lease = lease
        self.flush_interval = flush
        #: set by the service: forwarding needs it (without it, accounts owned elsewhere are refused)
        self.nc: Any = None
        self.slots: dict[str, _Slot] = {}
        self.marks: dict[str, Decimal] = {}
        self.kill_global: str | None = None
        #: when `risk.ctl` last set the global kill switch (Redis answers sent before it are older)
        self._kill_ctl_at = 0.0
        #: why Redis is considered unreachable (the service's watch), else None
        self.redis_down: str | None = None
        self._mark_at: dict[str, float] = {}
        self._marks_waiting: dict[str, list[_Job]] = {}
        self._marks_refreshing: set[str] = set()
        self._limits_cache: dict[bytes, Limits] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._dirty: set[str] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        #: the write-behind is due: it runs right after the next reply is handed to NATS
        self._flush_due = False
        #: when `record` last ran (monotonic): a reply went out
        self._replied = 0.0
        #: execution reports applied here whose write is not confirmed yet: seen key -> its write
        self._seen: dict[str, asyncio.Future[str]] = {}
        #: decisions not written yet, oldest first: (account id, record JSON)
        self.audit: list[tuple[str, bytes]] = []
        #: the latest audit batch: True once written, False if it failed (its records wait again)
        self._audit_written: asyncio.Future[bool] | None = None

    # --- entry points ------------------------------------------------------------------------------

    def start(
        self, req: RiskCheckRequest, reply: Reply, reply_to: str | None = None, hops: int = 0
    ) -> RiskDecision | None:
        """Begin deciding `req`. A decision made at once is returned (the caller replies and then calls
        `record`); else `await reply(decision)` follows, or the check was forwarded with `reply_to`."""
        return self._step(_Job(req=req, reply=reply, reply_to=reply_to, hops=hops))

    def record(self, req: RiskCheckRequest, decision: RiskDecision) -> None:
        """Queue the audit record and the metric of a decision, right after its reply was handed to
        NATS; a write-behind that is due goes out now.

        That is when background writes cost a check least: a sequential requester is busy reading
        the answer and sending its next request, so the write's CPU (here and in Redis) does not
        delay a check that is waiting. Under load a reply goes out every few microseconds anyway.
        """
        self._replied = time.monotonic()
        record = AuditRecord(at=time.time(), replica=self.replica, request=req, decision=decision)
        self.audit.append((_account_str(req.account_id), codec.encode(record)))
        _decision_counter(decision.decision, decision.rule or "").inc()
        if self._flush_due:
            self._flush()
        else:
            self._schedule_flush(self.flush_interval)

    async def write_audit(self) -> None:
        """Write the decisions recorded so far now (a read of the audit lists follows; a clean stop).

        If Redis is unreachable they stay queued for a later flush (up to `AUDIT_BACKLOG`).
        """
        written = self._audit_written
        if written is not None and not written.done():
            await asyncio.shield(written)
        for _ in range(-(-len(self.audit) // AUDIT_PER_FLUSH)):
            self._flush()
            written = self._audit_written
            if written is None or not await asyncio.shield(written):
                return

    def on_trade(self, data: bytes) -> None:
        """A public trade print (`ex.trade.<symbol>`): the freshest mark of its symbol."""
        try:
            print_ = codec.decode(data, TradePrint)
        except ValidationError:
            return
        self.marks[print_.symbol] = print_.price
        self._mark_at[print_.symbol] = time.monotonic()

    async def apply_exec(self, report: ExecReport, hops: int = 0) -> str:
        """Apply one execution report as the account's owner (forwarded to it if that is another
        replica): `applied` once the change reached Redis, `dup` or `noop`."""
        if report.account_id == LIQUIDITY_ACCOUNT_ID or not can_change(report):
            return "noop"
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await self._run(_Job(report=report, future=future, hops=hops))
        return await future

    async def release(self, cmd: CancelCmd) -> str:
        """Drop the open exposure of an approved order that never reached the book."""
        return await self.apply_exec(_release_report(cmd))

    async def snapshot(self, account: str) -> CachedAccount | None:
        """The account's state: this replica's memory if it owns it, else Redis (written behind by the
        owner, at most a flush interval late); limits loaded from Postgres if Redis has none."""
        slot = self.slots.get(account)
        if slot is not None and slot.token is not None and slot.state is not None and slot.limits is not None:
            return CachedAccount(slot.state.copy(), slot.limits)
        for _ in range(3):
            result = await self.batcher.call(orjson.dumps({"op": "s", "a": account}))
            acct = self._parse(result[1])
            if acct is not None:
                return CachedAccount(acct[0], acct[1])
            await self._ensure_limits(account)
        return None

    async def set_limits(self, account: str, limits: Limits, *, only_if_absent: bool = False) -> None:
        """Write the account's limits to Redis (the owner learns them from `risk.ctl`)."""
        item = {"op": "l", "a": account, "lim": limits.model_dump_json(), "nx": only_if_absent}
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

    def owned(self) -> list[str]:
        """The accounts this replica owns now."""
        return sorted(a for a, slot in self.slots.items() if slot.token is not None)

    # --- control (`risk.ctl`, the lease loop, the Redis watch) ----------------------------------------

    def ctl_limits(self, account: str, limits: Limits) -> None:
        """New limits for an account (every replica hears them; the owner uses them at once)."""
        slot = self.slots.get(account)
        if slot is None:
            return
        if slot.limits is not None and slot.token is not None:
            slot.limits = limits
        if slot.acquiring or slot.loading:
            slot.ctl_limits = limits

    def ctl_kill(self, scope: str | None, text: str | None) -> None:
        """A kill switch engaged (`text`) or released (None); `scope` None is the global one."""
        if scope is None:
            self.kill_global, self._kill_ctl_at = text, time.monotonic()
            return
        slot = self.slots.get(scope)
        if slot is None:
            return
        if slot.token is not None:
            slot.kill = text
        if slot.acquiring or slot.loading:
            slot.ctl_kill = (text,)

    def ctl_gone(self, replica: str) -> None:
        """Another replica stopped: forget that it owned anything."""
        for slot in self.slots.values():
            if slot.owner == replica:
                slot.owner = None

    def redis_lost(self, reason: str) -> None:
        """The Redis watch lost Redis: decide nothing until it is back and the leases are renewed."""
        if self.redis_down is None:
            _log.warning("Redis unreachable: risk checks refused", error=reason)
        self.redis_down = reason

    def redis_back(self) -> None:
        if self.redis_down is not None:
            _log.info("Redis reachable again")
            self.redis_down = None
            self._spawn(self.renew())

    def health(self) -> str:
        """`ok`, or why checks are refused (for /readyz)."""
        if self.redis_down is not None:
            return f"Redis unreachable ({self.redis_down}): risk checks refused"
        return "ok"

    async def run_leases(self, stopping: asyncio.Event) -> None:
        """Renew this replica's leases every quarter lease (and register it as live) until `stopping`."""
        while not stopping.is_set():
            try:
                await self.renew()
            except Exception as exc:
                _log.warning("lease renewal failed", error=repr(exc))
            try:
                await asyncio.wait_for(stopping.wait(), self.lease / 4)
            except TimeoutError:
                pass

    async def renew(self) -> None:
        """One renewal of every lease held (idle accounts are handed back instead)."""
        now = time.monotonic()
        held: list[tuple[str, str]] = []
        for account, slot in list(self.slots.items()):
            if slot.token is None:
                if not slot.acquiring and not slot.waiting and now - slot.used > IDLE_RELEASE:
                    del self.slots[account]
                continue
            idle = now - slot.used > IDLE_RELEASE and not slot.dirty and not slot.waiting
            if idle and not slot.loading:
                self._spawn(self._hand_back(account, slot))
                continue
            held.append((account, slot.token))
        flat: list[str] = []
        for account, token in held:
            flat += (account, token)
        # registered as live (risk.ctl waits for its confirmation) only once it listens on NATS
        item = {
            "op": "ren",
            "r": self.replica,
            "ms": int(self.lease * 1000),
            "accts": flat,
            "reg": self.nc is not None,
        }
        result = await self.batcher.call(orjson.dumps(item))
        lost = set(result[1]) if isinstance(result[1], list) else set()
        self._global_kill_from_redis(result[2], now)
        until = now + self.lease * 0.75
        for account, token in held:
            current = self.slots.get(account)
            if current is None or current.token != token:
                continue
            if account in lost:
                self._lose(account, current, "lease expired")
            else:
                current.valid_until = until

    async def live_replicas(self) -> list[str]:
        """The replicas whose registration has not expired (they renew it with their leases)."""
        result = await self.batcher.call(orjson.dumps({"op": "live", "a": ""}))
        return [str(r) for r in result[1]] if isinstance(result[1], list) else []

    async def close(self) -> None:
        """Write what is pending, hand every lease back and deregister (a clean stop)."""
        self._flush()
        for account, slot in list(self.slots.items()):
            if slot.token is not None:
                try:
                    await self._hand_back(account, slot, force=True)
                except Exception as exc:
                    _log.warning("lease not handed back", account=account, error=repr(exc))
        try:
            await self.batcher.call(orjson.dumps({"op": "bye", "a": "", "r": self.replica}))
        except Exception as exc:
            _log.debug("replica not deregistered", error=repr(exc))

    def _global_kill_from_redis(self, text: str, sent: float) -> None:
        """The global kill switch as a script call sent at `sent` read it, unless `risk.ctl` told
        this replica something newer meanwhile."""
        if sent > self._kill_ctl_at:
            self.kill_global = text or None

    # --- routing -----------------------------------------------------------------------------------

    async def _run(self, job: _Job) -> None:
        decision = self._step(job)
        if decision is not None:
            await self._finish(job, decision)

    def _step(self, job: _Job) -> RiskDecision | None:
        account = job.account
        slot = self.slots.get(account)
        now = time.monotonic()
        if slot is None:
            slot = self.slots[account] = _Slot()
        slot.used = now
        if self.redis_down is not None:
            return self._refuse(job, _unavailable_text(self.redis_down))
        if slot.token is not None:
            if slot.state is None:
                slot.waiting.append(job)
                return None
            if now >= slot.valid_until:
                return self._refuse(job, "the lease on the account could not be renewed in time")
            if job.req is None:
                self._spawn(self._apply(job, account, slot))
                return None
            if not self._marks_ready(job, slot.state):
                return None
            return self._decide(job, account, slot)
        if slot.acquiring:
            slot.waiting.append(job)
            return None
        if slot.owner is not None and now < slot.owner_until:
            return self._forward(job, slot.owner)
        slot.waiting.append(job)
        self._acquire(account, slot)
        return None

    def _forward(self, job: _Job, owner: str) -> RiskDecision | None:
        if self.nc is None or owner == self.replica or job.hops >= MAX_HOPS:
            return self._refuse(job, "the account's ownership is moving between replicas; try again")
        FORWARDED.inc()
        subject = subjects.risk_own(owner)
        headers = {HOPS_HEADER: str(job.hops + 1)}
        if job.req is not None and job.reply_to is not None:
            self._spawn(self.nc.publish(subject, codec.encode(job.req), reply=job.reply_to, headers=headers))
        else:
            self._spawn(self._forward_request(job, owner, subject, headers))
        return None

    async def _forward_request(self, job: _Job, owner: str, subject: str, headers: dict[str, str]) -> None:
        if job.report is not None:
            headers[OP_HEADER] = "exec"
            body = codec.encode(job.report)
        else:
            assert job.req is not None
            body = codec.encode(job.req)
        try:
            msg = await self.nc.request(subject, body, timeout=FORWARD_TIMEOUT, headers=headers)
        except Exception as exc:
            slot = self.slots.get(job.account)
            if slot is not None and slot.owner == owner:
                slot.owner = None
            await self._fail(job, f"the owner replica {owner} did not answer ({type(exc).__name__})")
            return
        if job.req is not None:
            assert job.reply is not None
            try:
                decision = codec.decode(msg.data, RiskDecision)
            except ValidationError as exc:
                decision = reject("risk_unavailable", f"unreadable answer of replica {owner}: {exc}")
            await job.reply(decision)
        elif job.future is not None and not job.future.done():
            text = msg.data.decode()
            if text in ("applied", "dup", "noop"):
                job.future.set_result(text)
            else:
                job.future.set_exception(RuntimeError(text))

    def _acquire(self, account: str, slot: _Slot) -> None:
        slot.acquiring = True
        sent = time.monotonic()

        async def cont(result: Any) -> None:
            slot.acquiring = False
            if isinstance(result, BaseException):
                await self._fail_waiting(slot, _unavailable_text(str(result) or type(result).__name__))
                return
            if result[0] == "own":
                slot.token, slot.valid_until, slot.owner = result[1], sent + self.lease * 0.75, None
                self._global_kill_from_redis(result[3], sent)
                if not result[2].get("lim"):
                    slot.loading = True  # limits come from Postgres first (not from inside the batch loop)
                    self._spawn(self._load_limits(account, slot, slot.token))
                    return
                self._install(slot, result[2])
            else:
                owner = str(result[1]).split(" ", 1)[0]
                pttl = max(float(result[2]), 0.0) / 1000
                slot.owner, slot.owner_until = owner, time.monotonic() + min(pttl, HINT_TTL)
            await self._resume(slot)

        self.batcher.submit(
            orjson.dumps({"op": "acq", "a": account, "r": self.replica, "ms": int(self.lease * 1000)}), cont
        )

    async def _load_limits(self, account: str, slot: _Slot, token: str) -> None:
        try:
            await self._ensure_limits(account)
            result = await self.batcher.call(orjson.dumps({"op": "s", "a": account}))
        except Exception as exc:
            slot.loading = False
            if slot.token == token:
                await self._hand_back(account, slot, force=True)
            await self._fail_waiting(slot, _unavailable_text(str(exc) or type(exc).__name__))
            return
        slot.loading = False
        if slot.token != token:  # lost meanwhile
            await self._resume(slot)
            return
        self._install(slot, result[1])
        await self._resume(slot)

    def _install(self, slot: _Slot, snap: Any) -> None:
        parsed = self._parse(snap)
        if parsed is None:
            parsed = (AccountRiskState(), Limits())
        slot.state, slot.limits = parsed
        slot.listed, slot.rate_ttl_until = False, 0.0
        slot.kill = snap.get("kill") or None
        rate = snap.get("rate")
        slot.bucket = None
        if isinstance(rate, list) and len(rate) == 2 and rate[0] and rate[1]:
            slot.bucket = TokenBucket(float(rate[0]), float(rate[1]))
        if slot.ctl_limits is not None:
            slot.limits, slot.ctl_limits = slot.ctl_limits, None
        if slot.ctl_kill is not None:
            slot.kill, slot.ctl_kill = slot.ctl_kill[0], None

    async def _ensure_limits(self, account: str) -> None:
        limits = await self.load_limits(account)
        await self.set_limits(account, limits, only_if_absent=True)

    async def _resume(self, slot: _Slot) -> None:
        waiting, slot.waiting = slot.waiting, []
        for job in waiting:
            job.attempts += 1
            if job.attempts > MAX_HOPS * 4:
                await self._fail(job, "the account's ownership is moving between replicas; try again")
            else:
                await self._run(job)

    async def _fail_waiting(self, slot: _Slot, why: str) -> None:
        waiting, slot.waiting = slot.waiting, []
        for job in waiting:
            await self._fail(job, why)

    def _lose(self, account: str, slot: _Slot, why: str) -> None:
        """The lease is gone (expired, or a write was fenced): forget the state, retry what waits."""
        LEASES_LOST.inc()
        _log.warning("account lease lost", account=account, reason=why)
        slot.token, slot.state, slot.limits, slot.bucket, slot.kill = None, None, None, None, None
        slot.valid_until = 0.0
        slot.owner = None
        self._drop_writes(slot, RuntimeError(f"risk lost the account's lease ({why}); not written"))
        self._dirty.discard(account)
        if slot.waiting:
            self._spawn(self._resume(slot))

    async def _hand_back(self, account: str, slot: _Slot, *, force: bool = False) -> None:
        token = slot.token
        if token is None or (slot.dirty and not force):
            return
        slot.token, slot.state, slot.limits, slot.bucket, slot.kill = None, None, None, None, None
        self._drop_writes(slot, RuntimeError("risk handed the account's lease back; not written"))
        self._dirty.discard(account)
        if not slot.waiting:
            self.slots.pop(account, None)
        await self.batcher.call(orjson.dumps({"op": "rel", "a": account, "tok": token}))
        if slot.waiting:
            await self._resume(slot)

    # --- deciding and applying (the owner) -----------------------------------------------------------

    def _decide(self, job: _Job, account: str, slot: _Slot) -> RiskDecision:
        req = job.req
        state, limits = slot.state, slot.limits
        assert req is not None and state is not None and limits is not None
        kill = self.kill_global or slot.kill
        if kill is not None:
            return reject("kill_switch", kill)
        decision = check(req, limits, state, self.marks)
        if decision.decision == "reject":
            return decision
        rate = limits.max_orders_per_second
        if rate is not None:
            ok, slot.bucket = take(slot.bucket, time.time(), float(rate))
            slot.w_rate = True
            if not ok:
                self._mark_dirty(account)
                return reject(
                    "max_orders_per_second", f"max_orders_per_second {fmt(rate)} exceeded", throttled=True
                )
        oid = reserve_for(state, req, decision, self.marks)
        if req.replaces is not None:
            slot.w_open[str(req.replaces)] = ""
        slot.w_open[oid if oid is not None else str(req.order_id)] = None  # encoded by the flush
        self._mark_dirty(account)
        return decision

    async def _apply(self, job: _Job, account: str, slot: _Slot) -> None:
        report, future = job.report, job.future
        assert report is not None and future is not None
        key = seen_key(report.symbol, report.seq) if report.seq >= 0 else ""
        if key:
            pending = self._seen.get(key)
            if pending is not None:  # a redelivery while its first copy's write is in flight
                try:
                    await asyncio.shield(pending)
                except Exception as exc:
                    _settle(future, exc)
                    return
                _settle(future, "dup")
                return
            mine: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._seen[key] = mine
            mine.add_done_callback(lambda _: self._seen.pop(key, None))
            try:
                seen = await self.batcher.call(orjson.dumps({"op": "x", "a": "", "dk": key}))
            except Exception as exc:
                _settle(mine, exc)
                _settle(future, exc)
                return
            if seen[1]:
                _settle(mine, "dup")
                _settle(future, "dup")
                return
            token = slot.token
            if token is None or slot.state is None:  # lost meanwhile: route again
                _settle(mine, RuntimeError("lease lost"))
                self._spawn(self._run(job))
                return
            future.add_done_callback(lambda f: _settle(mine, f.exception() or f.result()))
        state = slot.state
        if state is None:
            self._spawn(self._run(job))
            return
        effect = state.apply_exec(report)
        if effect.empty:
            _settle(future, "noop")
            return
        if effect.position is not None:
            symbol, pos = effect.position
            slot.w_pos[symbol] = pos.to_json().decode() if pos is not None else ""
        for oid, order in effect.orders:
            slot.w_open[oid] = order.to_json().decode() if order is not None else ""
        if effect.day is not None:
            slot.w_day = day_to_json(*effect.day).decode()
        if key:
            slot.w_seen.append(key)
        slot.w_waiters.append(future)
        self._mark_dirty(account)

    # --- write-behind --------------------------------------------------------------------------------

    def _mark_dirty(self, account: str) -> None:
        self._dirty.add(account)
        self._schedule_flush(self.flush_interval)

    def _schedule_flush(self, delay: float) -> None:
        """Make the write-behind due `delay` from now, unless it already is or will be."""
        if self._flush_handle is None and not self._flush_due:
            self._flush_handle = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        """`flush_interval` after the first change: write behind once the next reply went out (`record`),
        at the latest one more interval later; at once when no check was answered meanwhile (only
        execution reports are waiting)."""
        if time.monotonic() - self._replied > self.flush_interval:
            self._flush()
            return
        self._flush_due = True
        self._flush_handle = asyncio.get_running_loop().call_later(self.flush_interval, self._flush)

    def _flush(self) -> None:
        """One write-behind batch: one script item with an entry per dirty account, then one with the
        audit records (both in one script call)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_handle = None
        self._flush_due = False
        dirty, self._dirty = self._dirty, set()
        now = time.monotonic()
        entries: list[list[str]] = []
        batch: list[_Written] = []
        for account in dirty:
            slot = self.slots.get(account)
            if slot is None or slot.token is None or not slot.dirty:
                continue
            rate = slot.bucket if slot.w_rate else None
            refresh = rate is not None and now >= slot.rate_ttl_until
            if refresh:
                slot.rate_ttl_until = now + RATE_TTL_REFRESH
            entries.append(
                write_entry(
                    account,
                    slot.token,
                    _open_changes(slot.w_open, slot.state),
                    [x for pair in slot.w_pos.items() for x in pair],
                    slot.w_day,
                    slot.w_seen,
                    (f"{rate.tokens:.6f}", f"{rate.at:.6f}", refresh) if rate is not None else None,
                    not slot.listed,
                )
            )
            batch.append(
                _Written(
                    account,
                    slot,
                    slot.token,
                    (slot.w_open, slot.w_pos, slot.w_day, slot.w_seen, slot.w_rate),
                    slot.w_waiters,
                )
            )
            slot.w_open, slot.w_pos, slot.w_day, slot.w_seen, slot.w_rate = {}, {}, "", [], False
            slot.w_waiters = []
        if entries:

            async def cont(result: Any) -> None:
                if isinstance(result, BaseException):
                    for w in batch:
                        self._unwritten(w)
                    return
                statuses = result[1] if isinstance(result[1], list) else []
                for w, status in zip(batch, statuses, strict=False):
                    self._written(w, status)

            self.batcher.submit(write_item(entries), cont)
        if self.audit:
            self._flush_audit()

    def _flush_audit(self) -> None:
        """The oldest audit records (one batch in flight at a time, so a failed one goes back in front
        of the rest and the lists keep the order of the decisions)."""
        if self._audit_written is not None and not self._audit_written.done():
            return  # the next flush takes them
        records = self.audit[:AUDIT_PER_FLUSH]
        del self.audit[:AUDIT_PER_FLUSH]
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._audit_written = done

        async def cont(result: Any) -> None:
            ok = not isinstance(result, BaseException)
            if not ok:
                self.audit[:0] = records
                dropped = max(0, len(self.audit) - AUDIT_BACKLOG)
                del self.audit[:dropped]
                _log.warning(
                    "decision audit not written yet (Redis unreachable)",
                    pending=len(self.audit),
                    dropped=dropped,
                    error=repr(result),
                )
            if not done.done():
                done.set_result(ok)
            if self.audit:
                self._schedule_flush(self.flush_interval if ok else RETRY_FLUSH)

        self.batcher.submit(audit_item(records), cont)

    def _written(self, w: _Written, status: str) -> None:
        if status == "ok":
            if w.slot.token == w.token:
                w.slot.listed = True
            for f in w.waiters:
                _settle(f, "applied")
            return
        for f in w.waiters:
            _settle(f, RuntimeError(f"risk write refused: {status}"))
        if w.slot.token == w.token:
            self._lose(w.account, w.slot, f"write refused ({status}): another replica took the lease")

    def _unwritten(self, w: _Written) -> None:
        """The batch did not reach Redis: keep its changes (under newer ones) and try again later."""
        slot = w.slot
        if slot.token != w.token:  # lost or handed back meanwhile: nobody may write it now
            for f in w.waiters:
                _settle(f, RuntimeError("risk lost the account's lease; not written"))
            return
        w_open, w_pos, w_day, w_seen, w_rate = w.changes
        slot.w_open = {**w_open, **slot.w_open}
        slot.w_pos = {**w_pos, **slot.w_pos}
        slot.w_day = slot.w_day or w_day
        slot.w_seen = w_seen + slot.w_seen
        slot.w_rate = slot.w_rate or w_rate
        slot.w_waiters = w.waiters + slot.w_waiters
        self._dirty.add(w.account)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(RETRY_FLUSH, self._flush)

    def _drop_writes(self, slot: _Slot, exc: BaseException) -> None:
        for w in slot.w_waiters:
            _settle(w, exc)
        slot.w_open, slot.w_pos, slot.w_day, slot.w_seen, slot.w_rate = {}, {}, "", [], False
        slot.w_waiters = []

    # --- marks -------------------------------------------------------------------------------------

    def _marks_ready(self, job: _Job, state: AccountRiskState) -> bool:
        """True if every mark the check needs was read once; stale ones are refreshed in the background."""
        req = job.req
        assert req is not None
        now = time.monotonic()
        missing: list[str] = []
        stale: list[str] = []
        for symbol in _symbols(req.symbol, state):
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
                        await self._fail(job, _unavailable_text(str(result) or type(result).__name__))
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
                await self._run(job)

        self.batcher.submit(orjson.dumps({"op": "m", "a": "", "syms": ask}), cont)

    # --- outcomes ----------------------------------------------------------------------------------

    def _refuse(self, job: _Job, why: str) -> RiskDecision | None:
        """A check's refusal (returned: the caller answers it); a report's future fails instead."""
        if job.req is not None:
            return reject("risk_unavailable", f"risk state unavailable ({why}); order refused")
        if job.future is not None:
            _settle(job.future, RuntimeError(why))
        return None

    async def _fail(self, job: _Job, why: str) -> None:
        decision = self._refuse(job, why)
        if decision is not None:
            await self._finish(job, decision)

    async def _finish(self, job: _Job, decision: RiskDecision) -> None:
        req, reply = job.req, job.reply
        assert req is not None and reply is not None
        try:
            await reply(decision)
        except Exception as exc:
            _log.warning("risk reply failed", error=repr(exc))
        # nats-py writes the reply from its flusher task, woken by the publish: the audit record
        # (written by the service in batches) and the metric are queued behind that write
        asyncio.get_running_loop().call_soon(self.record, req, decision)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- helpers -----------------------------------------------------------------------------------

    def _parse(self, snap: Any) -> tuple[AccountRiskState, Limits] | None:
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
        return state, limits


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


def _account_str(account: UUID) -> str:
    """An account id as text (`UUID.__str__` is Python code, and every check needs it twice)."""
    text = _ACCOUNT_TEXT.get(account)
    if text is None:
        if len(_ACCOUNT_TEXT) >= 100_000:
            _ACCOUNT_TEXT.clear()
        text = _ACCOUNT_TEXT[account] = str(account)
    return text


def _open_changes(changes: dict[str, str | None], state: AccountRiskState | None) -> list[str]:
    """The `open` hash's changes as flat [order id, JSON or '' (delete), ...], encoding the orders
    marked None from the state as it is now."""
    opens = state.open_orders if state is not None else {}
    flat: list[str] = []
    for oid, raw in changes.items():
        if raw is None:
            order = opens.get(oid)
            raw = order.to_json().decode() if order is not None else ""
        flat += (oid, raw)
    return flat


def _symbols(symbol: str, state: AccountRiskState) -> Iterable[str]:
    yield symbol
    for s in state.positions:
        if s != symbol:
            yield s
    for s in state.open_symbols():
        if s != symbol and s not in state.positions:
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


def _unavailable_text(detail: str) -> str:
    return f"Redis unreachable: {detail}"


def _settle(future: asyncio.Future[str], outcome: str | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _release_report(cmd: CancelCmd) -> ExecReport:
    """`risk.release` as the report that releases the order's open exposure (never deduplicated)."""
    return ExecReport(
        exec=ExecType.REJECTED,
        seq=-1,
        order_id=cmd.order_id,
        account_id=cmd.account_id,
        symbol=cmd.symbol,
        side=Side.BUY,
        t=cmd.t,
        reason=cmd.reason,
    )
