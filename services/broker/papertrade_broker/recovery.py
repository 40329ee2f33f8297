"""Start-up recovery of the orders a stopped broker left between its commit and its command.

The broker commits a new order (`pending_new`) and then publishes its command to EX_CMD; a cancel is
committed as `pending_cancel` and then published. A broker killed between the two steps leaves an
order that no command will ever move: `pending_new` with buying power held and risk's exposure
reserved, or `pending_cancel` still open at the book until somebody asks to cancel it again.

At start-up, once `BROKER_RECOVERY_GRACE` has passed (so that the commands of orders in flight, of
this process or of another replica, have had their time), `recover` looks at the orders that are
still in one of those states and were last changed before this process started:

- `pending_new`: EX_CMD is read, headers only, from a minute before the oldest such order, for the
  command's message id (`<id>:new`, or `<replaced id>:replace:<id>`). An order whose command is there
  is the book's and the ledger's, whatever their delay. One whose command is not there is rejected,
  as an order whose command JetStream refused is: its buying power and risk's reservation are
  released (a replacement frees the order it was to replace and keeps risk's reservation, as a
  refused replace does). It is never sent late: the user may have been told it was accepted, but
  sending it to the book after a crash and a restart of unknown length could execute an order the
  user no longer expects.
- `pending_cancel`: the cancel is published again. A book that no longer holds the order refuses it
  (the ledger ignores that refusal for an order already done), and JetStream drops it if the first
  one was stored within its duplicate window.

A scan that cannot finish (NATS or Postgres unreachable, the stream not answering) changes nothing
and is tried again later: an order is only rejected once the whole stream since it was read. Until
a pass went through, the desk answers 503 to a cancel of a `pending_new` order from before its start
(`Desk.cancel`): a book that never got the order would refuse the cancel, and the ledger would put the
order back to `new`, open here and absent there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import Counter
from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from papertrade import codec
from papertrade.bus import subjects
from papertrade.enums import OrderStatus
from papertrade.messages import CancelCmd
from papertrade.timeutil import utcnow
from papertrade_broker.tables import orders

_log = structlog.get_logger("papertrade_broker.recovery")

RECOVERED = Counter(
    "papertrade_broker_recovered_orders_total",
    "Orders a stopped broker left between commit and command, by what start-up recovery did",
    ["action"],
)

#: why such an order is rejected
REASON = "not routed: the broker stopped before the order's command reached the exchange"
#: how far before the oldest order the stream is read (clocks of the broker and NATS may differ)
SCAN_MARGIN = timedelta(minutes=1)
#: the longest a scan of EX_CMD may take before it is given up (and tried again)
SCAN_TIMEOUT = 120.0
#: seconds before the second attempt when one failed (doubling up to `RETRY_MAX`)
RETRY_FIRST = 5.0
RETRY_MAX = 300.0


@dataclass(frozen=True)
class Stuck:
    """An order left pending: what recovery needs of its row."""

    id: UUID
    account_id: UUID
    symbol: str
    status: OrderStatus
    replaces: UUID | None
    created_at: datetime

    @property
    def msg_id(self) -> str:
        """The message id its command was published with (`Desk`)."""
        if self.replaces is not None:
            return f"{self.replaces}:replace:{self.id}"
        return f"{self.id}:new"


@dataclass
class Outcome:
    rejected: list[UUID]
    routed: list[UUID]
    cancels_resent: list[UUID]


async def recover(
    engine: AsyncEngine,
    js: JetStreamContext,
    started: datetime,
    release: Callable[[UUID, str, UUID, str], Awaitable[None]],
    announce: Callable[[Mapping[str, Any]], Awaitable[None]],
    exchange_time: Callable[[], Awaitable[datetime]],
) -> Outcome:
    """One pass over the orders left pending before `started` (see the module's docstring).

    `release(account_id, symbol, order_id, reason)` gives risk a rejected order's exposure back,
    `announce(row)` publishes its trade update; `exchange_time()` stamps a re-sent cancel. Raises if
    the stream could not be read to its end (before anything changed) or a cancel could not be sent
    (the next attempt sends it)."""
    stuck = await _stuck(engine, started)
    outcome = Outcome([], [], [])
    new = [s for s in stuck if s.status is OrderStatus.PENDING_NEW]
    if new:
        stored = await stored_msg_ids(
            js, min(s.created_at for s in new) - SCAN_MARGIN, {s.msg_id for s in new}
        )
        for order in new:
            if order.msg_id in stored:
                outcome.routed.append(order.id)
            elif (row := await reject_unrouted(engine, order.id, REASON)) is not None:
                outcome.rejected.append(order.id)
                if order.replaces is None:  # a replacement keeps risk's reservation, as a refused one does
                    await release(order.account_id, order.symbol, order.id, REASON)
                await announce(row)
    for order in stuck:
        if order.status is OrderStatus.PENDING_CANCEL:
            cmd = CancelCmd(
                order_id=order.id, account_id=order.account_id, symbol=order.symbol, t=await exchange_time()
            )
            await js.publish(
                subjects.ex_cmd(order.symbol),
                codec.encode(cmd),
                headers={"Nats-Msg-Id": f"{order.id}:cancel"},
            )
            outcome.cancels_resent.append(order.id)
    for action, ids in (
        ("rejected", outcome.rejected),
        ("routed", outcome.routed),
        ("cancel_resent", outcome.cancels_resent),
    ):
        if ids:
            RECOVERED.labels(action).inc(len(ids))
    if stuck:
        _log.warning(
            "orders left pending by a stopped broker",
            rejected=[str(i) for i in outcome.rejected],
            command_found=len(outcome.routed),
            cancels_resent=[str(i) for i in outcome.cancels_resent],
        )
    return outcome


async def recover_in_background(
    grace: float, attempt: Callable[[], Awaitable[Outcome]], stopping: asyncio.Event
) -> None:
    """`attempt` once `grace` seconds have passed, and again after a failure (`RETRY_FIRST` later,
    doubling up to `RETRY_MAX`) until one succeeds or the service stops."""
    await asyncio.sleep(grace)
    wait = RETRY_FIRST
    while not stopping.is_set():
        try:
            await attempt()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning(
                "start-up recovery of pending orders failed; trying again", error=repr(exc), retry_in=wait
            )
        await asyncio.sleep(wait)
        wait = min(wait * 2, RETRY_MAX)


async def reject_unrouted(engine: AsyncEngine, order_id: UUID, reason: str) -> Mapping[str, Any] | None:
    """Reject a new order whose command is not in EX_CMD, if it is still pending_new (the ledger may
    have moved it meanwhile), its buying power released and the order it was to replace freed: the
    rejected row, else None."""
    now = utcnow()
    async with engine.begin() as conn:
        row = (
            (
                await conn.execute(
                    update(orders)
                    .where(orders.c.id == order_id, orders.c.status == OrderStatus.PENDING_NEW.value)
                    .values(
                        status=OrderStatus.REJECTED.value,
                        reason=reason,
                        reserved=0,
                        failed_at=now,
                        updated_at=now,
                    )
                    .returning(orders)
                )
            )
            .mappings()
            .first()
        )
        if row is not None:
            await conn.execute(
                update(orders).where(orders.c.replaced_by == order_id).values(replaced_by=None)
            )
    return row


async def stored_msg_ids(js: JetStreamContext, since: datetime, wanted: set[str]) -> set[str]:
    """Which of the message ids `wanted` EX_CMD holds among its messages stored from `since` on (read
    to the stream's last message at the time of the call, headers only)."""
    info = await js.stream_info(subjects.STREAM_EX_CMD)
    last = int(info.state.last_seq or 0)
    if not last:
        return set()
    newest = (await js.get_msg(subjects.STREAM_EX_CMD, seq=last)).time
    if newest is not None and _aware(newest) < since:  # nothing stored since: nothing to read
        return set()
    found: set[str] = set()
    done = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Msg) -> None:
        msg_id = msg.headers.get("Nats-Msg-Id") if msg.headers else None
        if msg_id in wanted:
            found.add(msg_id)
        if msg.metadata.sequence.stream >= last and not done.done():
            done.set_result(None)

    sub = await js.subscribe(
        subjects.EX_CMD_ALL,
        cb=on_msg,
        ordered_consumer=True,
        stream=subjects.STREAM_EX_CMD,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since, headers_only=True
        ),
    )
    try:
        await asyncio.wait_for(done, SCAN_TIMEOUT)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found


async def _stuck(engine: AsyncEngine, started: datetime) -> list[Stuck]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(
                    orders.c.id,
                    orders.c.account_id,
                    orders.c.symbol,
                    orders.c.status,
                    orders.c.replaces,
                    orders.c.created_at,
                ).where(
                    or_(
                        (orders.c.status == OrderStatus.PENDING_NEW.value) & (orders.c.created_at < started),
                        (orders.c.status == OrderStatus.PENDING_CANCEL.value)
                        & (orders.c.updated_at < started),
                    )
                )
            )
        ).all()
    return [
        Stuck(r.id, r.account_id, r.symbol, OrderStatus(r.status), r.replaces, _aware(r.created_at))
        for r in rows
    ]


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
