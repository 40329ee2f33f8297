"""The exchange's pipelined report publishing: acks awaited per flush, and a report the stream did not
acknowledge published again, in order, with every report after it (their ids make repeats harmless)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from papertrade.codec import decode
from papertrade.messages import ExecReport
from papertrade_orderbook import exchange as X
from papertrade_orderbook.exchange import Exchange
from papertrade_orderbook.settings import OrderbookSettings
from tests.orderbook.helpers import Harness

PREFIX = "_INBOX.test."


class _Nats:
    """Records core publishes (the pipelined reports); never answers."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str | None, dict[str, str] | None]] = []

    async def publish(
        self, subject: str, data: bytes, reply: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.sent.append((subject, data, reply, headers))


class _JetStream:
    """Records the awaited re-publishes of `_js_publish`."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, str] | None]] = []

    async def publish(
        self, subject: str, data: bytes, timeout: float = 5, headers: dict[str, str] | None = None
    ) -> Any:
        self.sent.append((subject, data, headers))
        return SimpleNamespace(seq=len(self.sent))


def _ack(n: int, data: bytes = b'{"stream":"EX_EXEC","seq":1}', headers: Any = None) -> Any:
    return SimpleNamespace(subject=f"{PREFIX}{n}", data=data, headers=headers)


async def _exchange_with_reports(stored: int = 0) -> tuple[Exchange, _Nats, _JetStream, list[ExecReport]]:
    ctx: Any = SimpleNamespace(
        log=structlog.get_logger("test"), stopping=SimpleNamespace(is_set=lambda: False)
    )
    ex = Exchange(ctx, OrderbookSettings())
    nc, js = _Nats(), _JetStream()
    ex._nc, ex._js, ex._ack_prefix = nc, js, PREFIX
    h = Harness()
    reports = h.new(1, "buy", 10, "100.00") + h.new(2, "sell", 4, "100.00")  # accepted, accepted, 2 fills
    assert len(reports) == 4
    ex._last_published[h.symbol] = stored  # the last report EX_EXEC holds for the symbol
    await ex._publish_reports(h.symbol, reports, None, live=False)
    if stored:
        return ex, nc, js, reports
    assert [r for _, _, r, _ in nc.sent] == [f"{PREFIX}{n}" for n in range(1, 5)]
    assert [h_["Nats-Msg-Id"] for _, _, _, h_ in nc.sent if h_] == [f"AAPL:{r.seq}" for r in reports]
    return ex, nc, js, reports


async def test_all_acknowledged_nothing_published_again() -> None:
    ex, _, js, _ = await _exchange_with_reports()
    for n in (1, 2, 3, 4):
        await ex._on_ack(_ack(n, b'{"stream":"EX_EXEC","seq":9,"duplicate":true}'))
    await ex._flush()
    assert js.sent == []


async def test_a_refused_report_is_published_again_with_every_report_after_it() -> None:
    ex, _, js, reports = await _exchange_with_reports()
    await ex._on_ack(_ack(1))
    await ex._on_ack(_ack(2, b'{"error":{"code":503,"description":"stream unavailable"}}'))
    await ex._on_ack(_ack(3))
    await ex._on_ack(_ack(4, b"", {"Status": "503"}))  # no responders
    await ex._flush()
    assert [decode(d, ExecReport) for _, d, _ in js.sent] == reports[1:]
    assert [h["Nats-Msg-Id"] for _, _, h in js.sent if h] == [f"AAPL:{r.seq}" for r in reports[1:]]


async def test_unanswered_reports_are_published_again_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(X, "_ACK_TIMEOUT", 0.05)
    ex, _, js, reports = await _exchange_with_reports()
    await ex._on_ack(_ack(1))
    await ex._on_ack(_ack(2))
    await ex._flush()  # 3 and 4 never answered
    assert [decode(d, ExecReport) for _, d, _ in js.sent] == reports[2:]
    await ex._on_ack(_ack(3))  # late: ignored, the flush is done with it
    await ex._flush()
    assert len(js.sent) == 2


async def test_replayed_reports_near_the_stored_end_are_published_again() -> None:
    """After a SIGKILL, a report refused while later ones of its batch were stored may be missing below
    the last stored seq: the last `_ACK_BATCH` below it are published again (their ids drop repeats)."""
    _, nc, _, reports = await _exchange_with_reports(stored=4)
    assert [h_["Nats-Msg-Id"] for _, _, _, h_ in nc.sent if h_] == [f"AAPL:{r.seq}" for r in reports]


async def test_replayed_reports_far_below_the_stored_end_are_not_published_again() -> None:
    ex, nc, _, _ = await _exchange_with_reports(stored=4 + X._ACK_BATCH)
    assert nc.sent == []
    assert ex._last_published["AAPL"] == 4 + X._ACK_BATCH  # live reports go on from the stored end
