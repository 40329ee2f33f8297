"""The risk service's background work: the `risk.check` responder (and this replica's own subject
`risk.own.<replica>` for what other replicas forward to the owner), `risk.ctl` (limits and kill
switch changes every replica confirms), the execution-report consumer, the lease loop, the Redis
watch, the decision audit writer, and the kill switches (Postgres, restored into Redis after a
Redis loss).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
import structlog
from nats.aio.msg import Msg
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from papertrade import codec
from papertrade.bus import subjects
from papertrade.bus.pull import Puller, exec_puller
from papertrade.errors import ValidationError
from papertrade.messages import CancelCmd, ExecReport, RiskCheckRequest, RiskDecision
from papertrade.risk import Limits, reject
from papertrade.service import ServiceContext
from papertrade_risk.engine import HOPS_HEADER, OP_HEADER, AuditRecord, RiskChecker
from papertrade_risk.store import (
    ACCOUNTS,
    KILL_GLOBAL,
    KILL_SYNCED,
    LOG,
    kill_account_key,
    log_key,
)
from papertrade_risk.tables import kill_switches_table

_log = structlog.get_logger("risk")

QUEUE_GROUP = "risk"
DURABLE = "risk"
GLOBAL = "global"
#: seconds a `risk.ctl` change waits for every live replica's confirmation
CTL_TIMEOUT = 2.0
#: seconds the Redis watch blocks on its key per round (a dead Redis is noticed at once: the
#: connection breaks; a hung one within this plus the client's socket timeout, and by the lease
#: renewals before that). Every round wakes this process and Redis beside the checks.
WATCH_BLOCK = 1.0


class RiskService:
    def __init__(
        self,
        ctx: ServiceContext,
        checker: RiskChecker,
        redis: Redis,
        durable: str = DURABLE,
        watch: Redis | None = None,
    ) -> None:
        self.ctx = ctx
        self.checker = checker
        self.redis = redis
        self.durable = durable
        self.subscribed = False
        self.consuming = False
        self.applied = 0
        self._subs: list[Any] = []
        #: the exec stream's reader while `consume` runs
        self._puller: Puller | None = None
        #: subscriptions kept until the leases are handed back (own subject, risk.ctl)
        self._own_subs: list[Any] = []
        self._watch = watch if watch is not None else redis

    # --- risk.check --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Subscribe to `risk.check` (queue group: replicas share), this replica's own subject (what
        other replicas forward to the owner), `risk.ctl`, trade prints (marks) and `risk.release`."""
        nc = await self.ctx.links.wait_nats()
        checker = self.checker
        loop = asyncio.get_running_loop()

        async def on_check(msg: Msg) -> None:
            reply = msg.reply
            if not reply:
                return
            hops = _hops(msg)
            data = msg.data
            if data[:1] == b"[" or data.lstrip()[:1] == b"[":
                self.ctx.spawn(self._check_array(reply, data, hops), "risk-check-array")
                return

            async def respond(decision: RiskDecision) -> None:
                await nc.publish(reply, codec.encode(decision))

            try:
                req = codec.decode(data, RiskCheckRequest)
            except ValidationError as exc:
                await nc.publish(
                    reply, codec.encode(reject("request", f"unreadable risk.check request: {exc}"))
                )
                return
            decision = checker.start(req, respond, reply, hops)
            if decision is not None:
                await nc.publish(reply, codec.encode(decision))
                loop.call_soon(checker.record, req, decision)

        async def on_own(msg: Msg) -> None:
            if msg.headers and msg.headers.get(OP_HEADER) == "exec":
                self.ctx.spawn(self._forwarded_exec(msg), "risk-forwarded-exec")
                return
            await on_check(msg)

        async def on_ctl(msg: Msg) -> None:
            try:
                self._apply_ctl(orjson.loads(msg.data))
            except Exception as exc:
                _log.warning("unreadable risk.ctl message", error=repr(exc))
                return
            if msg.reply:
                await nc.publish(msg.reply, orjson.dumps({"r": checker.replica}))

        async def on_trade(msg: Msg) -> None:
            checker.on_trade(msg.data)

        async def on_release(msg: Msg) -> None:
            try:
                cmd = codec.decode(msg.data, CancelCmd)
            except ValidationError as exc:
                _log.warning("unreadable risk.release skipped", error=str(exc))
                return
            self.ctx.spawn(self._release(cmd), "risk-release")

        big_msgs, big_bytes = 1_000_000, 512 * 1024 * 1024
        self._own_subs.append(await nc.subscribe(subjects.RISK_CTL, cb=on_ctl))
        self._own_subs.append(
            await nc.subscribe(
                subjects.risk_own(checker.replica),
                cb=on_own,
                pending_msgs_limit=big_msgs,
                pending_bytes_limit=big_bytes,
            )
        )
        await nc.flush()  # risk.ctl is heard before this replica registers as live
        checker.nc = nc  # forwarding on; registered as live (risk.ctl) from this renewal on
        try:
            await checker.renew()
        except Exception as exc:
            _log.warning("first lease renewal failed", error=repr(exc))
        self._subs.append(
            await nc.subscribe(
                subjects.RISK_CHECK,
                queue=QUEUE_GROUP,
                cb=on_check,
                pending_msgs_limit=big_msgs,
                pending_bytes_limit=big_bytes,
            )
        )
        self._subs.append(
            await nc.subscribe(subjects.EX_TRADE_ALL, cb=on_trade, pending_msgs_limit=1_000_000)
        )
        self._subs.append(await nc.subscribe(subjects.RISK_RELEASE, queue=QUEUE_GROUP, cb=on_release))
        await nc.flush()
        self.subscribed = True
        _log.info("risk.check responder subscribed", queue=QUEUE_GROUP, replica=checker.replica)

    async def broadcast(self, change: dict[str, Any]) -> None:
        """Send a change on `risk.ctl` and wait until every live replica confirmed it applied it."""
        nc = await self.ctx.links.wait_nats()
        live = set(await self.checker.live_replicas()) | {self.checker.replica}
        got: set[str] = set()
        done = asyncio.get_running_loop().create_future()

        async def on_ack(msg: Msg) -> None:
            try:
                got.add(str(orjson.loads(msg.data)["r"]))
            except Exception:
                return
            if live <= got and not done.done():
                done.set_result(None)

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_ack)
        try:
            await nc.publish(subjects.RISK_CTL, orjson.dumps(change), reply=inbox)
            try:
                await asyncio.wait_for(done, CTL_TIMEOUT)
            except TimeoutError:
                missing = ", ".join(sorted(live - got))
                raise RuntimeError(f"risk replicas {missing} did not confirm the change") from None
        finally:
            await sub.unsubscribe()

    async def watch_redis(self) -> None:
        """Block on a key of this replica's in Redis, round after round: a broken connection tells at
        once that Redis is gone (the checker then refuses every order until it is back)."""
        key = f"pt:risk:watch:{self.checker.replica}"
        while not self.ctx.stopping.is_set():
            try:
                await self._watch.blpop([key], timeout=WATCH_BLOCK)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.checker.redis_lost(str(exc) or type(exc).__name__)
                await asyncio.sleep(0.05)
                continue
            self.checker.redis_back()

    async def _check_array(self, reply: str, data: bytes, hops: int) -> None:
        """The array form: decisions in the order of the requests, one answer (parts owned by other
        replicas are asked of them)."""
        nc = self.ctx.links.nats
        try:
            reqs = codec.decode(data, list[RiskCheckRequest])
        except ValidationError as exc:
            await nc.publish(reply, codec.encode(reject("request", f"unreadable risk.check request: {exc}")))
            return
        loop = asyncio.get_running_loop()
        out: list[RiskDecision | None] = [None] * len(reqs)
        pending: list[tuple[int, asyncio.Future[RiskDecision]]] = []
        for i, req in enumerate(reqs):
            fut: asyncio.Future[RiskDecision] = loop.create_future()
            decision = self.checker.start(req, _resolver(fut), None, hops)
            if decision is not None:
                out[i] = decision
                loop.call_soon(self.checker.record, req, decision)
            else:
                pending.append((i, fut))
        for i, fut in pending:
            out[i] = await fut
        await nc.publish(reply, codec.encode(out))

    async def _forwarded_exec(self, msg: Msg) -> None:
        try:
            report = codec.decode(msg.data, ExecReport)
            outcome = await self.checker.apply_exec(report, _hops(msg))
        except Exception as exc:
            outcome = f"error: {exc}"
        if msg.reply:
            await self.ctx.links.nats.publish(msg.reply, outcome.encode())

    def _apply_ctl(self, change: dict[str, Any]) -> None:
        op = change.get("op")
        if op == "limits":
            self.checker.ctl_limits(str(change["a"]), Limits.model_validate_json(change["lim"]))
        elif op == "kill":
            scope = change.get("scope")
            self.checker.ctl_kill(None if scope == GLOBAL else str(scope), change.get("text"))
        elif op == "gone":
            self.checker.ctl_gone(str(change["r"]))

    async def _release(self, cmd: CancelCmd) -> None:
        try:
            await self.checker.release(cmd)
        except Exception as exc:
            _log.warning("risk.release not applied", order_id=str(cmd.order_id), error=repr(exc))

    # --- execution reports -------------------------------------------------------------------------

    async def consume(self) -> None:
        """Keep positions and open exposure current from `ex.exec.>` (durable consumer shared by replicas)."""
        while not self.ctx.stopping.is_set():
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.consuming = False
                _log.warning("execution consumer restarting", error=repr(exc))
                await asyncio.sleep(0.5)

    async def handle(self, msgs: Sequence[Msg]) -> None:
        """Apply a fetched batch: every report is started in order (each account's owner applies them
        in that order), then each is acked once its write reached Redis (nak: redelivered)."""
        applying = [asyncio.ensure_future(self._apply(msg)) for msg in msgs]
        for msg, task in zip(msgs, applying, strict=True):
            try:
                await task
            except Exception as exc:
                _log.warning("execution report not applied; redelivery", error=repr(exc))
                await msg.nak(delay=1.0)
                continue
            await msg.ack()

    async def close(self) -> None:
        """Stop taking work, write what is pending, hand the leases back, tell the other replicas."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                _log.debug("unsubscribe failed", error=repr(exc))
        self._subs.clear()
        if self._puller is not None:  # reports delivered and not applied go back at once
            await self._puller.stop()
        try:
            await self.checker.close()
            nc = self.ctx.links.nats if self.subscribed else None
            if nc is not None:
                await nc.publish(subjects.RISK_CTL, orjson.dumps({"op": "gone", "r": self.checker.replica}))
                await nc.flush()
        except Exception as exc:
            _log.warning("leases not handed back", error=repr(exc))
        for sub in self._own_subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                _log.debug("unsubscribe failed", error=repr(exc))
        self._own_subs.clear()
        await self.checker.write_audit()

    async def _consume(self) -> None:
        await self.ctx.links.wait_nats()
        puller = await exec_puller(self.ctx.links.nats, self.durable)
        self._puller = puller
        self.consuming = True
        try:
            while not self.ctx.stopping.is_set():
                msgs = await puller.next_batch(1.0)
                if msgs:
                    await self.handle(msgs)
        finally:
            self._puller = None
            await puller.stop()

    async def _apply(self, msg: Msg) -> None:
        try:
            report = codec.decode(msg.data, ExecReport)
        except ValidationError as exc:
            _log.error("unreadable execution report skipped", subject=msg.subject, error=str(exc))
            return
        outcome = await self.checker.apply_exec(report)
        if outcome == "applied":
            self.applied += 1

    # --- audit -------------------------------------------------------------------------------------

    async def decisions(self, account_id: str | None, limit: int) -> list[Any]:
        """Recent decisions, newest first (the checker writes them with its write-behind)."""
        await self.checker.write_audit()
        key = log_key(account_id) if account_id else LOG
        raw = await self.redis.lrange(key, 0, limit - 1)
        out = []
        for r in raw:
            try:
                out.append(codec.decode(r, AuditRecord).flat())
            except ValidationError as exc:  # one damaged entry must not hide the others
                _log.warning("unreadable decision record skipped", key=key, error=str(exc))
        return out

    # --- kill switches -----------------------------------------------------------------------------

    async def set_kill_switch(self, account_id: str | None, engaged: bool, reason: str) -> None:
        """Durable in Postgres first, then live in Redis (what every check reads)."""
        scope = account_id or GLOBAL
        now = datetime.now(UTC)
        async with self.ctx.links.engine.begin() as conn:
            stmt = insert(kill_switches_table).values(
                scope=scope, engaged=engaged, reason=reason, updated_at=now
            )
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[kill_switches_table.c.scope],
                    set_={"engaged": engaged, "reason": reason, "updated_at": now},
                )
            )
        text = await self._apply_kill(scope, engaged, reason)
        await self.broadcast({"op": "kill", "scope": scope, "text": text})

    async def kill_switches(self) -> dict[str, Any]:
        rows = await self._kill_rows()
        out: dict[str, Any] = {"global": {"engaged": False, "reason": None}, "accounts": {}}
        for scope, engaged, reason in rows:
            entry = {"engaged": engaged, "reason": reason or None}
            if scope == GLOBAL:
                out["global"] = entry
            else:
                out["accounts"][scope] = entry
        return out

    async def cancel_open_orders(self, account_id: str | None) -> int:
        """Publish a CancelCmd on `ex.cmd.<symbol>` for every open order risk tracks (one account or all)."""
        if account_id is not None:
            accounts = [account_id]
        else:
            members = await self.redis.smembers(ACCOUNTS)
            accounts = [a.decode() if isinstance(a, bytes) else str(a) for a in members]
        js = self.ctx.links.js
        now = datetime.now(UTC)
        sent = 0
        for account in accounts:
            acct = await self.checker.snapshot(account)
            if acct is None:
                continue
            for oid, order in list(acct.state.open_orders.items()):
                cmd = CancelCmd(
                    order_id=UUID(oid),
                    account_id=UUID(account),
                    symbol=order.symbol,
                    t=now,
                    reason="kill switch engaged",
                )
                await js.publish(
                    subjects.ex_cmd(order.symbol),
                    codec.encode(cmd),
                    headers={"Nats-Msg-Id": f"risk-kill-cancel-{oid}"},
                )
                sent += 1
        return sent

    async def restore_kill_switches(self) -> None:
        """After Redis lost its data (no `kill:synced` marker), copy the kill switches from Postgres."""
        while not self.ctx.stopping.is_set():
            try:
                if not await self.redis.exists(KILL_SYNCED):
                    for scope, engaged, reason in await self._kill_rows():
                        text = await self._apply_kill(scope, engaged, reason or "")
                        await self.broadcast({"op": "kill", "scope": scope, "text": text})
                    await self.redis.set(KILL_SYNCED, b"1")
                    _log.info("kill switches restored into Redis")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.debug("kill switch restore pending", error=repr(exc))
            await asyncio.sleep(2.0)

    async def _kill_rows(self) -> list[tuple[str, bool, str]]:
        async with self.ctx.links.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        kill_switches_table.c.scope,
                        kill_switches_table.c.engaged,
                        kill_switches_table.c.reason,
                    ).order_by(kill_switches_table.c.scope)
                )
            ).all()
        return [(r[0], bool(r[1]), r[2] or "") for r in rows]

    async def _apply_kill(self, scope: str, engaged: bool, reason: str) -> str | None:
        """Write the kill switch to Redis; the reason text orders get (None: released)."""
        key = KILL_GLOBAL if scope == GLOBAL else kill_account_key(scope)
        if engaged:
            who = "for all accounts" if scope == GLOBAL else "for this account"
            text = f"kill switch engaged {who}" + (f": {reason}" if reason else "")
            await self.redis.set(key, text.encode())
            return text
        await self.redis.delete(key)
        return None


def _hops(msg: Msg) -> int:
    headers = msg.headers
    if not headers:
        return 0
    try:
        return int(headers.get(HOPS_HEADER, 0))
    except ValueError:
        return 0


def _resolver(fut: asyncio.Future[RiskDecision]) -> Callable[[RiskDecision], Awaitable[None]]:
    async def resolve(decision: RiskDecision) -> None:
        if not fut.done():
            fut.set_result(decision)

    return resolve
