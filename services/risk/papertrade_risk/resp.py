"""A minimal Redis connection for the hot path: EVALSHA / SCRIPT LOAD with one bulk-string answer.

redis-py's asyncio client spends more time in Python per call than the Lua script takes in Redis;
the batcher needs exactly one command shape, so it speaks RESP itself over an asyncio Protocol
(pipelined: answers resolve the calls in order). Any connection error fails the pending calls and
the next call reconnects (the caller fails closed meanwhile).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast
from urllib.parse import urlsplit


class RedisReplyError(Exception):
    """Redis answered `-ERR ...`."""


class RespConnection:
    def __init__(self, url: str, timeout: float = 1.0) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.lstrip("/") or 0)
        self.password = parts.password
        self.username = parts.username
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def call(self, *args: bytes | str) -> bytes | int | None:
        """Send one command and wait for its answer (bulk string, integer, status or nil)."""
        proto = await self._connection()
        fut = proto.send(_pack(args))
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            self._drop(TimeoutError(f"Redis {self.host}:{self.port} did not answer within {self.timeout:g}s"))
            raise

    def close(self) -> None:
        self._drop(ConnectionError("closed"))

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.closed:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None and not self._proto.closed:
                return self._proto
            loop = asyncio.get_running_loop()
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(_Protocol, self.host, self.port), self.timeout
                )
            except (OSError, TimeoutError) as exc:
                raise ConnectionError(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from None
            if self.password:
                auth = (self.username, self.password) if self.username else (self.password,)
                await asyncio.wait_for(conn.send(_pack(("AUTH", *auth))), self.timeout)
            if self.db:
                await asyncio.wait_for(conn.send(_pack(("SELECT", str(self.db)))), self.timeout)
            self._proto = conn
            return conn

    def _drop(self, exc: BaseException) -> None:
        if self._proto is not None:
            self._proto.fail(exc)
            self._proto = None


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[bytes | int | None]] = deque()
        self.buffer = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def send(self, data: bytes) -> asyncio.Future[bytes | int | None]:
        if self.closed or self.transport is None:
            raise ConnectionError("Redis connection is closed")
        fut: asyncio.Future[bytes | int | None] = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        self.transport.write(data)
        return fut

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.pending:
            parsed = _parse(self.buffer)
            if parsed is None:
                return
            value, used = parsed
            del self.buffer[:used]
            fut = self.pending.popleft()
            if fut.done():
                continue
            if isinstance(value, RedisReplyError):
                fut.set_exception(value)
            else:
                fut.set_result(value)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("Redis closed the connection"))

    def fail(self, exc: BaseException) -> None:
        self.closed = True
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError(str(exc)))
        if self.transport is not None:
            self.transport.close()


def _pack(args: tuple[bytes | str | None, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        b = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _parse(buf: bytearray) -> tuple[bytes | int | RedisReplyError | None, int] | None:
    """One reply from the front of `buf`: (value, bytes used), or None if incomplete."""
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    kind, line = buf[:1], bytes(buf[1:end])
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            return None
        return bytes(buf[end + 2 : stop]), stop + 2
    if kind == b"+":
        return line, end + 2
    if kind == b":":
        return int(line), end + 2
    if kind == b"-":
        return RedisReplyError(line.decode(errors="replace")), end + 2
    return RedisReplyError(f"unexpected Redis reply type {kind!r}"), len(buf)
