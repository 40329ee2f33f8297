"""uvicorn's httptools protocol with a response's head and body sent in one write.

uvicorn writes the status line and headers of a response (`http.response.start`) to the socket at
once, then the body (`http.response.body`) in a second write: two `write` system calls and, with
TCP_NODELAY, two segments for every small JSON answer, so the client wakes up twice to read one
response. On loopback the sender also pays for the receiver's TCP processing of each segment.
`CoalescingHttpToolsProtocol` gives the protocol a transport that holds a write while nothing is
held and sends it together with the next one (head + body: one system call, one segment); a held
write that no other write follows (a `100 Continue`, the last chunk of a streamed body) goes out at
the end of the event loop's current turn, and before the connection closes. Everything else
(reading, flow control, addresses, close) is the real transport's.

`run_service` serves every service with it (`uvicorn.Config(http=CoalescingHttpToolsProtocol)`).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` writing through `CoalescingTransport`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not `asyncio.Transport` subclasses: no isinstance check here
        super().connection_made(CoalescingTransport(cast(asyncio.Transport, transport), self.loop))  # type: ignore[arg-type]


class CoalescingTransport:
    """A transport's writes two by two: a write is held until the next one (both go out in one
    system call) or until the end of the loop's current turn, whichever comes first."""

    __slots__ = ("_held", "_loop", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = bytes(data)  # the caller may reuse a buffer it passed
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._flush_soon)
            return
        self._held = None
        self._transport.write(held + data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Send what is held now."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + (len(self._held) if self._held else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()
