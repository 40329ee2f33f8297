"""Two risk replicas side by side, restarts, and a Redis that goes away (fail closed)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import nats
from redis.asyncio import Redis

from papertrade import codec
from papertrade.bus import subjects
from papertrade.enums import ExecType, Side
from papertrade.messages import ExecReport
from papertrade.stack.infra import Endpoints, Infra
from tests.conftest import ServiceStarter
from tests.risk.conftest import ADMIN, ask, fresh_symbol, put_limits, request, start_risk

D = Decimal


async def _decisions(url: str, account: uuid.UUID) -> list[Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{url}/v1/decisions", params={"account_id": str(account), "limit": 1000})
    assert r.status_code == 200, r.text
    rows: list[Any] = r.json()
    return rows


async def _replica(url: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{url}/v1/replica", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def _forwarded(url: str) -> float:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("papertrade_risk_forwarded_total ")
    )


async def test_two_replicas_never_approve_past_a_limit(
    start_services: ServiceStarter, infra: Endpoints
) -> None:
    _, url_a = start_services("risk")
    _, url_b = start_services("risk")
    nc = await nats.connect(infra.nats_url)
    try:
        # position limit: 100 shares, 3 rounds of 40 concurrent orders of 10 shares on one account
        for _ in range(3):
            account = uuid.uuid4()
            put_limits(url_a, account, max_position_qty=100)
            sym = fresh_symbol()
            reqs = [request(account, sym, "10", limit="5") for _ in range(40)]
            decisions = await asyncio.gather(*(ask(nc, r) for r in reqs))
            counts = Counter(d.decision for d in decisions)
            assert counts == {"approve": 10, "reject": 30}, decisions
            assert all(
                d.reason == "max_position_qty 100 exceeded: would be 110"
                for d in decisions
                if d.decision == "reject"
            )
        # one replica decides per account (its owner): the other forwarded what it received (queue
        # group), and both agree on what is reserved
        rows = await _decisions(url_a, account) + await _decisions(url_b, account)
        assert len({row["replica"] for row in rows}) == 1
        owners = [url for url in (url_a, url_b) if str(account) in (await _replica(url))["accounts"]]
        assert len(owners) == 1
        other = url_b if owners[0] == url_a else url_a
        assert await _forwarded(other) > 0
        async with httpx.AsyncClient(timeout=10) as client:
            for url in (url_a, url_b):
                e = (await client.get(f"{url}/v1/exposure/{account}")).json()
                assert sum(D(o["qty"]) for o in e["open_orders"].values()) == D("100")

        # gross exposure across symbols: 10,000 at most, orders of 10 x 50 = 500 each
        account = uuid.uuid4()
        put_limits(url_b, account, max_gross_exposure=10_000)
        reqs = [request(account, fresh_symbol(), "10", limit="50") for _ in range(40)]
        decisions = await asyncio.gather(*(ask(nc, r) for r in reqs))
        assert Counter(d.decision for d in decisions)["approve"] == 20, decisions

        # the order-rate bucket is shared too
        account = uuid.uuid4()
        put_limits(url_a, account, max_orders_per_second=2)
        sym = fresh_symbol()
        start = time.monotonic()
        decisions = await asyncio.gather(*(ask(nc, request(account, sym, "1")) for _ in range(20)))
        elapsed = time.monotonic() - start
        approved = sum(d.decision == "approve" for d in decisions)
        assert 2 <= approved <= 2 + int(elapsed * 2), (approved, elapsed)
        assert all(d.throttled for d in decisions if d.decision == "reject")
    finally:
        await nc.close()


async def test_replicas_apply_each_exec_report_once(start_services: ServiceStarter, infra: Endpoints) -> None:
    _, url_a = start_services("risk")
    _, url_b = start_services("risk")
    nc = await nats.connect(infra.nats_url)
    try:
        account = uuid.uuid4()
        sym = fresh_symbol()
        req = request(account, sym, "100", limit="10")
        assert (await ask(nc, req)).decision == "approve"
        js = nc.jetstream()
        seq0 = int(time.time() * 1000)
        for i in range(20):  # 20 fills of 5 at 10, each published twice (a redelivery)
            rep = ExecReport(
                exec=ExecType.FILL,
                seq=seq0 + i,
                order_id=req.order_id,
                account_id=account,
                symbol=sym,
                side=Side.BUY,
                t=datetime.now(UTC),
                exec_id=f"e{seq0}-{i}",
                price=D("10"),
                qty=D("5"),
                leaves_qty=D(100 - 5 * (i + 1)),
            )
            for _ in range(2):
                await js.publish(subjects.ex_exec(sym), codec.encode(rep))
        deadline = time.monotonic() + 15
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                e = (await client.get(f"{url_b}/v1/exposure/{account}")).json()
                if e["positions"].get(sym, {}).get("qty") == "100" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        assert e["positions"][sym] == {"qty": "100", "avg_entry_price": "10"}
        assert e["open_orders"] == {}
        await asyncio.sleep(0.5)  # redeliveries changed nothing
        e = (await _get(f"{url_a}/v1/exposure/{account}")).json()
        assert e["positions"][sym]["qty"] == "100"
    finally:
        await nc.close()


async def test_limits_and_kill_switches_survive_restarts_and_redis_loss(
    infra: Endpoints, tmp_path: Path
) -> None:
    account, killed = uuid.uuid4(), uuid.uuid4()
    sym = fresh_symbol()
    proc, url = start_risk(infra.env(), tmp_path / "a")
    try:
        put_limits(url, account, max_order_qty=5)
        r = await _post(
            f"{url}/v1/kill-switch",
            json={"account_id": str(killed), "engaged": True, "reason": "kept"},
            headers=ADMIN,
        )
        assert r.status_code == 200
    finally:
        proc.stop()
    # Redis loses risk's hot copy (a restart without persistence)
    redis = Redis.from_url(infra.redis_url)
    for key in (
        f"pt:risk:a:{account}:lim",
        f"pt:risk:a:{account}:v",
        f"pt:risk:kill:a:{killed}",
        "pt:risk:kill:synced",
    ):
        await redis.delete(key)
    await redis.aclose()
    proc, url = start_risk(infra.env(), tmp_path / "b")
    nc = await nats.connect(infra.nats_url)
    try:
        assert (await ask(nc, request(account, sym, "5"))).decision == "approve"
        d = await ask(nc, request(account, sym, "6"))
        assert d.decision == "reject" and d.reason == "max_order_qty 5 exceeded: order qty 6"
        assert (await _get(f"{url}/v1/limits/{account}")).json()["max_order_qty"] == "5"
        deadline = time.monotonic() + 10
        while True:
            d = await ask(nc, request(killed, sym, "1"))
            if d.decision == "reject" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert d.rule == "kill_switch" and d.reason == "kill switch engaged for this account: kept"
        await _post(
            f"{url}/v1/kill-switch", json={"account_id": str(killed), "engaged": False}, headers=ADMIN
        )
    finally:
        await nc.close()
        proc.stop()


async def test_redis_down_fails_closed(infra: Endpoints, tmp_path: Path) -> None:
    own = Infra(tmp_path / "own-redis", env={"NATS_URL": infra.nats_url, "DATABASE_URL": infra.database_url})
    endpoints = own.start()
    assert endpoints.embedded == {"redis"}
    proc = None
    nc = await nats.connect(infra.nats_url)
    try:
        proc, url = start_risk({**infra.env(), "REDIS_URL": endpoints.redis_url}, tmp_path / "logs")
        account = uuid.uuid4()
        sym = fresh_symbol()
        assert (await ask(nc, request(account, sym, "1"))).decision == "approve"
        own.stop()  # Redis goes away
        d = await ask(nc, request(account, sym, "1"))
        assert d.decision == "reject" and d.rule == "risk_unavailable" and not d.throttled
        assert d.reason is not None and "Redis unreachable" in d.reason and "order refused" in d.reason
        # a new account (nothing cached) is refused as well
        d = await ask(nc, request(uuid.uuid4(), sym, "1"))
        assert d.decision == "reject" and d.rule == "risk_unavailable"
        r = await _get(f"{url}/readyz")
        assert r.status_code == 503 and "redis" in r.json()["message"]
    finally:
        await nc.close()
        if proc is not None:
            proc.stop()
        own.stop()


async def _get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url)


async def _post(url: str, json: Any, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(url, json=json, headers=headers)
