"""`papertrade.service.http`: a response's head and body leave in one write, and nothing is lost,
reordered or held back (small answers, streamed bodies, `Connection: close`, 100-continue)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from papertrade.service.http import CoalescingHttpToolsProtocol, CoalescingTransport


class _FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def test_two_writes_leave_as_one_and_a_lone_write_leaves_at_the_end_of_the_turn() -> None:
    async def scenario() -> None:
        fake = _FakeTransport()
        t = CoalescingTransport(fake, asyncio.get_running_loop())  # type: ignore[arg-type]
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert fake.writes == []  # held for the body
        t.write(memoryview(b"body"))
        assert fake.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        t.write(bytearray(b"lone"))
        assert fake.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        assert t.get_write_buffer_size() == 4
        await asyncio.sleep(0)
        assert fake.writes[-1] == b"lone"
        await asyncio.sleep(0)
        assert len(fake.writes) == 2  # nothing sent twice
        t.write(b"last")
        t.close()  # what is held goes out before the connection closes
        assert fake.writes[-1] == b"last" and fake.closed
        await asyncio.sleep(0)
        assert len(fake.writes) == 3
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the real transport's

    asyncio.run(scenario())


def test_a_buffer_reused_by_the_caller_does_not_change_what_is_held() -> None:
    async def scenario() -> None:
        fake = _FakeTransport()
        t = CoalescingTransport(fake, asyncio.get_running_loop())  # type: ignore[arg-type]
        buf = bytearray(b"abc")
        t.write(buf)
        buf[:] = b"xyz"
        t.write(b"!")
        assert fake.writes == [b"abc!"]

    asyncio.run(scenario())


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"got": (await request.body()).decode()})

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(50):
                yield f"{i},".encode()
                if i % 7 == 0:
                    await asyncio.sleep(0.001)

        return StreamingResponse(chunks(), media_type="text/plain")

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        _app(), host="127.0.0.1", port=port, loop="uvloop", http=CoalescingHttpToolsProtocol, log_config=None
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_responses_over_one_keep_alive_connection_arrive_whole_and_in_order(server: str) -> None:
    with httpx.Client(base_url=server, timeout=5) as client:
        for i in range(200):
            r = client.post("/echo", content=f"order {i}")
            assert r.status_code == 200 and r.json() == {"got": f"order {i}"}
        streamed = client.get("/stream")
        assert streamed.text == "".join(f"{i}," for i in range(50))
        assert client.post("/echo", content="after").json() == {"got": "after"}


def test_connection_close_and_expect_100_continue(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\n"
        )
        assert s.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"hello")
        raw = b""
        while chunk := s.recv(65536):  # the server closes after its answer
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b'{"got":"hello"}'
