"""The decision audit: written with the write-behind, kept while Redis is unreachable, never reordered."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from papertrade.risk import APPROVE, reject
from papertrade.stack.infra import Endpoints
from papertrade_risk.engine import RiskChecker
from papertrade_risk.service import RiskService
from papertrade_risk.store import LuaBatcher
from tests.risk.conftest import fresh_symbol, request


def _decide(checker: RiskChecker, account: uuid.UUID, qty: str, approved: bool) -> None:
    """What the service does once a decision's reply went out."""
    req = request(account, fresh_symbol(), qty)
    decision = APPROVE if approved else reject("max_order_qty", f"max_order_qty 1 exceeded: order qty {qty}")
    checker.record(req, decision)


async def test_audit_survives_an_outage_in_order(infra: Endpoints) -> None:
    dead = LuaBatcher("redis://127.0.0.1:1/0", timeout=0.5)
    live = LuaBatcher(infra.redis_url)
    redis = Redis.from_url(infra.redis_url)
    checker = RiskChecker(dead, cast(Any, None), flush=60.0)
    svc = RiskService(cast(Any, None), checker, redis)
    a, b = uuid.uuid4(), uuid.uuid4()
    try:
        _decide(checker, a, "1", True)
        _decide(checker, b, "2", False)
        await checker.write_audit()  # Redis unreachable: kept, not dropped
        assert len(checker.audit) == 2
        _decide(checker, a, "3", False)
        await checker.write_audit()
        assert len(checker.audit) == 3
        checker.batcher = live  # Redis is back
        _decide(checker, b, "4", True)
        rows_a = await svc.decisions(str(a), 10)
        rows_b = await svc.decisions(str(b), 10)
        assert checker.audit == []
        # newest first, each account's own list
        assert [(r["qty"], r["decision"]) for r in rows_a] == [("3", "reject"), ("1", "approve")]
        assert [(r["qty"], r["decision"]) for r in rows_b] == [("4", "approve"), ("2", "reject")]
        assert rows_b[1]["rule"] == "max_order_qty"
        everyone = [r for r in await svc.decisions(None, 10_000) if r["account_id"] in (str(a), str(b))]
        assert [r["qty"] for r in everyone] == ["4", "3", "2", "1"]
    finally:
        await dead.close()
        await live.close()
        await redis.aclose()


@pytest.fixture
async def audited(infra: Endpoints) -> AsyncIterator[tuple[RiskChecker, RiskService, Redis]]:
    """A checker whose audit reaches Redis only when asked (`write_audit`, `decisions`)."""
    batcher = LuaBatcher(infra.redis_url)
    redis = Redis.from_url(infra.redis_url)
    checker = RiskChecker(batcher, cast(Any, None), flush=60.0)
    try:
        yield checker, RiskService(cast(Any, None), checker, redis), redis
    finally:
        await batcher.close()
        await redis.aclose()


async def test_audit_lists_are_capped(audited: tuple[RiskChecker, RiskService, Redis]) -> None:
    """More records than a flush carries: written over several flushes, the lists keep their caps."""
    from papertrade_risk import engine, store

    checker, svc, redis = audited
    account = uuid.uuid4()
    for i in range(store.LOG_PER_ACCOUNT + engine.AUDIT_PER_FLUSH // 2):
        _decide(checker, account, str(i + 1), True)
    rows = await svc.decisions(str(account), 100_000)
    assert len(rows) == store.LOG_PER_ACCOUNT
    assert rows[0]["qty"] == str(store.LOG_PER_ACCOUNT + engine.AUDIT_PER_FLUSH // 2)
    assert await redis.llen(store.LOG) <= store.LOG_ALL


async def test_a_damaged_record_does_not_hide_the_others(
    audited: tuple[RiskChecker, RiskService, Redis],
) -> None:
    from papertrade_risk import store

    checker, svc, redis = audited
    account = uuid.uuid4()
    _decide(checker, account, "1", True)
    await checker.write_audit()
    await redis.lpush(store.log_key(str(account)), b'{"not": "a decision"}')
    _decide(checker, account, "2", False)
    rows = await svc.decisions(str(account), 10)
    assert [(r["qty"], r["decision"]) for r in rows] == [("2", "reject"), ("1", "approve")]
