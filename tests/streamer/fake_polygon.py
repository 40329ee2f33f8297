"""A local fake of Polygon's aggregates endpoint serving recorded-shape responses (no network)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

GOOD_KEY = "good-key"
NO_PLAN_KEY = "basic-key"
BASE_MS = 1709562600000  # 2024-03-04T14:30:00Z


def _result(i: int) -> dict[str, Any]:
    c = 175.0 + i * 0.05
    return {
        "v": 1000 + i,
        "vw": round(c + 0.01, 4),
        "o": round(c - 0.02, 2),
        "c": round(c, 2),
        "h": round(c + 0.07, 2),
        "l": round(c - 0.09, 2),
        "t": BASE_MS + i * 60_000,
        "n": 10 + i,
    }


class FakePolygon:
    def __init__(self) -> None:
        self.requests: list[str] = []
        self.throttle = 0  # answer 429 this many times first
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.requests.append(self.path)
                parts = urlsplit(self.path)
                q = parse_qs(parts.query)
                key = q.get("apiKey", [""])[0]
                if key not in (GOOD_KEY, NO_PLAN_KEY):
                    return self._send(
                        401, {"status": "ERROR", "request_id": "r1", "error": "Unknown API Key"}
                    )
                if key == NO_PLAN_KEY:
                    return self._send(
                        403,
                        {
                            "status": "NOT_AUTHORIZED",
                            "request_id": "r2",
                            "message": "You are not entitled to this data. Please upgrade your plan.",
                        },
                    )
                if fake.throttle > 0:
                    fake.throttle -= 1
                    return self._send(
                        429,
                        {
                            "status": "ERROR",
                            "request_id": "r3",
                            "error": "You've exceeded the maximum requests per minute.",
                        },
                        {"Retry-After": "0"},
                    )
                segs = parts.path.split("/")  # /v2/aggs/ticker/{T}/range/{m}/{span}/{from}/{to}
                ticker = segs[4]
                cursor = q.get("cursor", [""])[0]
                if cursor == "":
                    rows = [_result(i) for i in range(3)]
                    nxt = f"{fake.url}{parts.path}?cursor=page2"
                elif cursor == "page2":
                    rows = [_result(i) for i in range(3, 5)]
                    nxt = None
                else:
                    return self._send(400, {"status": "ERROR", "error": "bad cursor"})
                body: dict[str, Any] = {
                    "ticker": ticker,
                    "queryCount": len(rows),
                    "resultsCount": len(rows),
                    "adjusted": True,
                    "results": rows,
                    "status": "OK",
                    "request_id": "r4",
                    "count": len(rows),
                }
                if nxt:
                    body["next_url"] = nxt
                self._send(200, body)

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    @contextmanager
    def running(self) -> Iterator[FakePolygon]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join(5)
