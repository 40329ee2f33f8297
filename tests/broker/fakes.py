"""In-test stand-ins for risk and the orderbook, on the real NATS, in their own thread and event loop.

`FakeExchange` answers `risk.check` (approve, or per-symbol reject / throttle / clip / silence) and
plays a minimal book on `ex.cmd.>`: it publishes ExecReports on `ex.exec.<symbol>` through JetStream
the way the orderbook does (accepted, fill, canceled, replaced), filling market orders and marketable
limits at the symbol's reference price and resting the rest.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

import nats
import orjson
from nats.aio.msg import Msg

from papertrade import codec
from papertrade.bus import subjects
from papertrade.bus.streams import ensure_streams
from papertrade.enums import ExecType, LiquiditySide, OrderType, Side
from papertrade.messages import (
    CancelCmd,
    Command,
    ExecReport,
    NewOrderCmd,
    ReplaceCmd,
    RiskCheckRequest,
    RiskDecision,
)
from papertrade.timeutil import utcnow


@dataclass
class _Resting:
    cmd: NewOrderCmd
    qty: Decimal
    filled: Decimal
    limit_price: Decimal | None
    stop_price: Decimal | None


class FakeExchange:
    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.prices: dict[str, Decimal] = {}
        #: symbol -> "reject" | "throttle" | "clip" | "clip_notional" | "silent"
        self.risk_mode: dict[str, str] = {}
        self.risk_requests: list[RiskCheckRequest] = []
        #: what the broker handed back on `risk.release`
        self.releases: list[CancelCmd] = []
        self.commands: list[Any] = []
        #: symbol -> fill market orders in this many partial fills
        self.partial: dict[str, int] = {}
        self.book_enabled = True
        self._resting: dict[UUID, _Resting] = {}
        self._seq = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fake-exchange")
        self._nc: Any = None
        self._js: Any = None

    def start(self) -> FakeExchange:
        self._thread.start()
        self.call(self._start())
        return self

    def stop(self) -> None:
        self.call(self._nc.drain())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def publish_report(self, report: ExecReport, msg_id: str | None = None) -> None:
        """Publish one execution report on JetStream (a test's hand-made report)."""
        self.call(self._publish(report, msg_id))

    def fill_resting(self, order_id: UUID, qty: Decimal | None = None, price: Decimal | None = None) -> None:
        """Fill a resting order (all of it by default) at its limit (or the reference price)."""
        self.call(self._fill_resting(order_id, qty, price))

    def watch_events(self, account_id: UUID | str) -> list[dict[str, Any]]:
        """Collect the trade updates published on `broker.event.<account_id>` into the returned list."""
        seen: list[dict[str, Any]] = []

        async def _sub() -> None:
            async def _cb(msg: Msg) -> None:
                seen.append(orjson.loads(msg.data))

            await self._nc.subscribe(subjects.broker_event(account_id), cb=_cb)
            await self._nc.flush()

        self.call(_sub())
        return seen

    def narrow_command_stream(self, subjects_: list[str] | None) -> None:
        """Make the EX_CMD stream take only `subjects_` (None: all of `ex.cmd.>` again)."""
        from dataclasses import replace

        from papertrade.bus.streams import EX_CMD_STREAM

        config = replace(EX_CMD_STREAM, subjects=subjects_) if subjects_ is not None else EX_CMD_STREAM
        self.call(self._js.update_stream(config))

    def resting(self) -> set[UUID]:
        return set(self._resting)

    # --- the thread's side ---------------------------------------------------------------------------

    async def _start(self) -> None:
        self._nc = await nats.connect(self.nats_url, name="fake-exchange")
        self._js = self._nc.jetstream()
        await ensure_streams(self._js)
        await self._nc.subscribe(subjects.RISK_CHECK, cb=self._on_risk)
        await self._nc.subscribe(subjects.RISK_RELEASE, cb=self._on_release)
        await self._nc.subscribe(subjects.EX_CMD_ALL, cb=self._on_cmd)
        await self._nc.flush()

    async def _on_risk(self, msg: Msg) -> None:
        """One check, or the array form (a list of checks answered by a list of decisions)."""
        batch = msg.data.lstrip().startswith(b"[")
        reqs = (
            codec.decode(msg.data, list[RiskCheckRequest])
            if batch
            else [codec.decode(msg.data, RiskCheckRequest)]
        )
        self.risk_requests.extend(reqs)
        decisions = [self._decide(req) for req in reqs]
        if any(d is None for d in decisions):  # "silent": no answer at all
            return
        await msg.respond(codec.encode(decisions if batch else decisions[0]))

    def _decide(self, req: RiskCheckRequest) -> RiskDecision | None:
        mode = self.risk_mode.get(req.symbol, "approve")
        if mode == "silent":
            return None
        if mode == "reject":
            return RiskDecision(decision="reject", reason="max_order_qty 1000 exceeded", rule="max_order_qty")
        if mode == "throttle":
            return RiskDecision(
                decision="reject",
                reason="max_orders_per_second 5 exceeded",
                rule="max_orders_per_second",
                throttled=True,
            )
        if mode == "clip":
            return RiskDecision(decision="clip", qty=Decimal(5), reason="clipped to max_order_qty 5")
        if mode == "clip_notional":  # what risk answers for a notional order: qty None, a new notional
            return RiskDecision(
                decision="clip", notional=Decimal(30), reason="clipped to max_order_notional 30"
            )
        return RiskDecision(decision="approve")

    async def _on_release(self, msg: Msg) -> None:
        self.releases.append(codec.decode(msg.data, CancelCmd))

    async def _on_cmd(self, msg: Msg) -> None:
        cmd = codec.decode(msg.data, Command)  # type: ignore[arg-type]
        self.commands.append(cmd)
        if not self.book_enabled:
            return
        if isinstance(cmd, NewOrderCmd):
            await self._new(cmd)
        elif isinstance(cmd, CancelCmd):
            rest = self._resting.pop(cmd.order_id, None)
            if rest is not None:
                await self._report(
                    rest.cmd, ExecType.CANCELED, leaves_qty=rest.qty - rest.filled, reason="user"
                )
        elif isinstance(cmd, ReplaceCmd):
            await self._replace(cmd)

    async def _new(self, cmd: NewOrderCmd) -> None:
        await self._report(cmd, ExecType.ACCEPTED)
        ref = self.prices.get(cmd.symbol, Decimal(100))
        qty = cmd.qty if cmd.qty is not None else (cmd.notional or Decimal(0)) // ref
        rest = _Resting(cmd, qty, Decimal(0), cmd.limit_price, cmd.stop_price)
        if cmd.type is OrderType.MARKET or (
            cmd.type is OrderType.LIMIT and _marketable(cmd.side, cmd.limit_price, ref)
        ):
            price = ref
            parts = self.partial.get(cmd.symbol, 1)
            step = qty / parts
            for i in range(parts):
                part = step if i < parts - 1 else qty - rest.filled
                rest.filled += part
                await self._fill(rest, part, price)
            return
        self._resting[cmd.order_id] = rest

    async def _replace(self, cmd: ReplaceCmd) -> None:
        rest = self._resting.pop(cmd.order_id, None)
        if rest is None:
            self._seq += 1
            report = ExecReport(
                exec=ExecType.REJECTED,
                seq=self._seq,
                order_id=cmd.order_id,
                account_id=cmd.account_id,
                symbol=cmd.symbol,
                side=Side.BUY,
                t=utcnow(),
                reason=f"replace: unknown or no longer open order id {cmd.order_id}",
                command="replace",
            )
            await self._publish(report, None)
            return
        await self._report(rest.cmd, ExecType.REPLACED, new_order_id=cmd.new_order_id)
        new_cmd = NewOrderCmd(
            order_id=cmd.new_order_id,
            account_id=cmd.account_id,
            symbol=cmd.symbol,
            side=rest.cmd.side,
            type=rest.cmd.type,
            time_in_force=cmd.time_in_force or rest.cmd.time_in_force,
            t=cmd.t,
            qty=cmd.qty or rest.qty,
            limit_price=cmd.limit_price or rest.limit_price,
            stop_price=cmd.stop_price or rest.stop_price,
        )
        self._resting[cmd.new_order_id] = _Resting(
            new_cmd, new_cmd.qty or rest.qty, rest.filled, new_cmd.limit_price, new_cmd.stop_price
        )

    async def _fill_resting(self, order_id: UUID, qty: Decimal | None, price: Decimal | None) -> None:
        rest = self._resting[order_id]
        part = qty if qty is not None else rest.qty - rest.filled
        px = price or rest.limit_price or rest.stop_price or self.prices.get(rest.cmd.symbol, Decimal(100))
        rest.filled += part
        if rest.filled >= rest.qty:
            self._resting.pop(order_id)
        await self._fill(rest, part, px)

    async def _fill(self, rest: _Resting, qty: Decimal, price: Decimal) -> None:
        await self._report(
            rest.cmd,
            ExecType.FILL,
            exec_id=f"E{uuid.uuid4().hex[:16]}",
            price=price,
            qty=qty,
            cum_qty=rest.filled,
            leaves_qty=rest.qty - rest.filled,
            liquidity=LiquiditySide.TAKER,
        )

    async def _report(self, cmd: NewOrderCmd, kind: ExecType, **fields: Any) -> None:
        self._seq += 1
        report = ExecReport(
            exec=kind,
            seq=self._seq,
            order_id=cmd.order_id,
            account_id=cmd.account_id,
            symbol=cmd.symbol,
            side=cmd.side,
            t=utcnow(),
            **fields,
        )
        await self._publish(report, None)

    async def _publish(self, report: ExecReport, msg_id: str | None) -> None:
        mid = msg_id or f"{report.order_id}:{report.exec.value}:{report.exec_id or ''}:{report.seq}"
        await self._js.publish(
            subjects.ex_exec(report.symbol), codec.encode(report), headers={"Nats-Msg-Id": mid}
        )


def _marketable(side: Side, limit: Decimal | None, ref: Decimal) -> bool:
    if limit is None:
        return False
    return limit >= ref if side is Side.BUY else limit <= ref


Waiter = Callable[[], bool]
