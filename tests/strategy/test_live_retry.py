"""The live context across a broker that dies mid-request: what is sent again, and what is not."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from uuid import uuid4

import httpx
import pytest

from papertrade.enums import Interval, OrderType, Side, TimeInForce
from papertrade.models import Order
from papertrade.strategy.context import OrderRequest
from papertrade.strategy.live import LiveContext
from papertrade.strategy.wire import order_to_alpaca


class DropFirst:
    """A real HTTP/1.1 server on loopback: the first request of each path is read and its connection
    closed without an answer (a broker SIGKILLed mid-request); later ones are answered."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[tuple[str, str, bytes]] = []
        self.dropped: set[str] = set()
        #: how many DELETEs are answered 503 (after the dropped one) before the usual answer
        self.unavailable = 0
        self.account = uuid4()
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                raw, body = head.split(b"\r\n\r\n", 1)
                lines = raw.decode().split("\r\n")
                method, target, _ = lines[0].split(" ")
                length = next(
                    (int(h.split(":")[1]) for h in lines[1:] if h.lower().startswith("content-length")), 0
                )
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append((method, target, body))
                key = f"{method} {target.split('?')[0]}"
                if key not in self.dropped:
                    self.dropped.add(key)
                    return  # closed without an answer
                status, payload = self._answer(method, body)
                out = json.dumps(payload).encode()
                conn.sendall(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(out)}\r\n\r\n".encode()
                    + out
                )

    def _answer(self, method: str, body: bytes) -> tuple[int, object]:
        if method == "POST":
            req = json.loads(body)
            t = datetime(2024, 1, 2, 15, 0, tzinfo=UTC)
            order = Order(
                id=uuid4(),
                client_order_id=req["client_order_id"],
                account_id=self.account,
                symbol=req["symbol"],
                side=Side(req["side"]),
                type=OrderType(req["type"]),
                time_in_force=TimeInForce(req["time_in_force"]),
                created_at=t,
                updated_at=t,
                submitted_at=t,
                qty=Decimal(req["qty"]),
            )
            return 200, order_to_alpaca(order)
        if method == "DELETE":
            if self.unavailable > 0:
                self.unavailable -= 1
                return 503, {"code": 50300000, "message": "order is being recovered after a broker restart"}
            return 422, {"code": 42210000, "message": "order is already canceled"}
        return 200, []


@pytest.fixture
def broker() -> Iterator[DropFirst]:
    server = DropFirst()
    yield server
    server.close()


def _context(url: str) -> LiveContext:
    return LiveContext(url, "k", "s", interval=Interval.parse("1m"), timeout=5.0)


def test_a_submit_lost_mid_request_is_sent_again_with_the_same_client_order_id(broker: DropFirst) -> None:
    ctx = _context(broker.url)
    order = ctx.submit(OrderRequest(symbol="AAPL", side=Side.BUY, qty=Decimal(3)))
    posts = [json.loads(b) for m, _, b in broker.requests if m == "POST"]
    assert len(posts) == 2
    assert posts[0]["client_order_id"] == posts[1]["client_order_id"] == order.client_order_id
    assert order.qty == Decimal(3)


def test_reads_and_cancels_lost_mid_request_are_sent_again(broker: DropFirst) -> None:
    ctx = _context(broker.url)
    assert ctx.open_orders() == []
    ctx.cancel(uuid4())  # the repeat answers 422 (already canceled): not an error
    assert [m for m, _, _ in broker.requests] == ["GET", "GET", "DELETE", "DELETE"]


def test_a_cancel_answered_503_is_asked_again(broker: DropFirst) -> None:
    ctx = _context(broker.url)
    broker.unavailable = 2
    ctx.cancel(uuid4())  # dropped, 503, 503, then 422 (already canceled): not an error
    assert [m for m, _, _ in broker.requests] == ["DELETE"] * 4


def test_a_request_without_an_idempotency_key_is_not_sent_twice(broker: DropFirst) -> None:
    ctx = _context(broker.url)
    with pytest.raises(httpx.RemoteProtocolError):
        ctx._send("PATCH", f"/v2/orders/{uuid4()}", json={"qty": "2"})
    assert len(broker.requests) == 1
