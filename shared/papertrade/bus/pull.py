"""Reading a durable JetStream pull consumer with `CONSUMER.MSG.NEXT` requests kept outstanding.

nats-py's `PullSubscription.fetch()` sends a request and then awaits each message with its own
timeout (a task and a uuid4 per message: ~15 % of risk's CPU under the broker benchmark's load).
`Puller` has one inbox subscription and keeps `outstanding` requests of `batch` messages each in
flight, re-issued as soon as one is used up or ends; messages arrive into a buffer while the caller
handles the previous batch, and `next_batch` takes what is there. Acking stays the caller's.

    puller = await exec_puller(nc, "broker-ledger")
    msgs = await puller.next_batch(0.5)     # [] after 0.5 s without a message
    ...
    await puller.stop()                     # naks what was delivered and not taken
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from papertrade.bus.streams import exec_consumer

#: Messages asked for by one pull request, and pull requests kept outstanding: at most their product
#: is delivered and not yet taken (the next batch, arriving while the caller handles one).
PULL_BATCH = 256
PULLS_OUTSTANDING = 2
#: How long a pull request waits on the server when nothing comes (seconds).
PULL_EXPIRES = 2.0


async def exec_puller(nc: NATS, durable: str) -> Puller:
    """The exec stream's durable consumer `durable` (created or found by `streams.exec_consumer`,
    the one definition of its settings), read by a started `Puller`."""
    sub = await exec_consumer(nc.jetstream(), durable)
    info = await sub.consumer_info()
    await sub.unsubscribe()  # its inbox only: the durable stays, the puller reads it
    puller = Puller(nc, info.stream_name, info.name)
    await puller.start()
    return puller


class Puller:
    """Reads a durable pull consumer: `outstanding` requests of `batch` messages each (expiring on
    the server after `expires` seconds) kept in flight, each re-issued as soon as it is used up or
    ends; what arrives waits in a buffer for `next_batch`."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        *,
        batch: int = PULL_BATCH,
        outstanding: int = PULLS_OUTSTANDING,
        expires: float = PULL_EXPIRES,
    ) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch = batch
        self._outstanding = outstanding
        self._expires = expires
        self._request = orjson.dumps({"batch": batch, "expires": int(expires * 1e9)})
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._buffer: list[Msg] = []
        self._arrived = asyncio.Event()
        #: What each outstanding pull request may still deliver, oldest first (the server serves
        #: waiting requests in order).
        self._pulls: deque[int] = deque()
        self._asked = 0.0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        await self._top_up()

    async def stop(self) -> None:
        """Unsubscribe; reports delivered and not booked are handed back at once (nak)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for msg in self._buffer:
            with contextlib.suppress(Exception):
                await msg.nak()
        self._buffer = []

    async def next_batch(self, timeout: float, most: int = PULL_BATCH) -> list[Msg]:
        """What has arrived (at most `most`), waiting up to `timeout` for the first message."""
        if not self._buffer:
            await self._top_up()
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        msgs = self._buffer[:most]
        del self._buffer[:most]
        return msgs

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            self._buffer.append(msg)
            self._arrived.set()
            if self._pulls:
                self._pulls[0] -= 1
                if self._pulls[0] <= 0:
                    self._pulls.popleft()
        elif status == "100":  # an idle heartbeat (not asked for): nothing ended
            return
        elif self._pulls:
            # 404 no messages, 408 request expired, 409 (max waiting, consumer deleted...): a pull
            # request ended.
            self._pulls.popleft()
        await self._top_up()

    async def _top_up(self) -> None:
        now = time.monotonic()
        if self._pulls and now - self._asked > self._expires + 1.0:
            # Every outstanding request has expired by now: their end (a status message) was lost.
            self._pulls.clear()
        while len(self._pulls) < self._outstanding and self._sub is not None:
            await self._nc.publish(self._next, self._request, reply=self._inbox)
            self._pulls.append(self._batch)
            self._asked = now
