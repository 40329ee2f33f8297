"""The decision audit: written off the reply path, kept while Redis is unreachable, never reordered."""

from __future__ import annotations

import time
import uuid
from typing import Any, cast

from redis.asyncio import Redis

from papertrade import codec
from papertrade.risk import APPROVE, reject
from papertrade.stack.infra import Endpoints
from papertrade_risk.engine import AuditRecord
from papertrade_risk.service import RiskService
from tests.risk.conftest import fresh_symbol, request


class _Checker:
    """Stands in for the RiskChecker: hands out the records queued in it, once."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    def take_audit(self) -> list[tuple[str, bytes]]:
        records, self.records = self.records, []
        return records


def _record(account: uuid.UUID, qty: str, approved: bool) -> tuple[str, bytes]:
    req = request(account, fresh_symbol(), qty)
    decision = APPROVE if approved else reject("max_order_qty", f"max_order_qty 1 exceeded: order qty {qty}")
    return str(account), codec.encode(
        AuditRecord(at=time.time(), replica="t", request=req, decision=decision)
    )


async def test_audit_survives_an_outage_in_order(infra: Endpoints) -> None:
    checker = _Checker()
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    live = Redis.from_url(infra.redis_url)
    svc = RiskService(cast(Any, None), cast(Any, checker), dead)
    a, b = uuid.uuid4(), uuid.uuid4()
    try:
        checker.records = [_record(a, "1", True), _record(b, "2", False)]
        await svc.flush_audit()  # Redis unreachable: kept, not dropped
        checker.records = [_record(a, "3", False)]
        await svc.flush_audit()
        svc.redis = live  # Redis is back
        checker.records = [_record(b, "4", True)]
        await svc.flush_audit()
        rows_a = await svc.decisions(str(a), 10)
        rows_b = await svc.decisions(str(b), 10)
        # newest first, each account's own list
        assert [(r["qty"], r["decision"]) for r in rows_a] == [("3", "reject"), ("1", "approve")]
        assert [(r["qty"], r["decision"]) for r in rows_b] == [("4", "approve"), ("2", "reject")]
        assert rows_b[1]["rule"] == "max_order_qty"
        everyone = [r for r in await svc.decisions(None, 10_000) if r["account_id"] in (str(a), str(b))]
        assert [r["qty"] for r in everyone] == ["4", "3", "2", "1"]
    finally:
        await dead.aclose()
        await live.aclose()
