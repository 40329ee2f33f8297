"""Ownership leases: one replica decides per account, takeover, fencing, forwarding, the array form,
execution reports applied once, and a lost Redis refusing orders with a reason that names it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import httpx
import nats
import orjson
import pytest
from redis.asyncio import Redis

from papertrade import codec
from papertrade.bus import subjects
from papertrade.enums import ExecType, Side
from papertrade.messages import ExecReport, RiskCheckRequest, RiskDecision
from papertrade.risk import Limits
from papertrade.stack.infra import Endpoints
from papertrade_risk.engine import RiskChecker
from papertrade_risk.store import LuaBatcher
from tests.conftest import ServiceStarter
from tests.risk.conftest import ADMIN, fresh_symbol, put_limits, request

D = Decimal
LEASE = 0.4


@pytest.fixture
async def checkers(infra: Endpoints) -> AsyncIterator[tuple[RiskChecker, RiskChecker]]:
    """Two replicas' checkers in this process (no NATS: nothing is forwarded), short leases, and
    nobody renewing them unless a test calls `renew()`: a replica that "died" just stops calling it."""
    made = []
    for name in ("a", "b"):
        batcher = LuaBatcher(infra.redis_url, 2.0)
        made.append(
            (RiskChecker(batcher, cast(Any, None), f"t{name}{uuid.uuid4().hex[:8]}", lease=LEASE), batcher)
        )
    yield made[0][0], made[1][0]
    for checker, batcher in made:
        await checker.close()
        await batcher.close()


async def _decide(checker: RiskChecker, req: RiskCheckRequest) -> RiskDecision:
    fut: asyncio.Future[RiskDecision] = asyncio.get_running_loop().create_future()

    async def reply(decision: RiskDecision) -> None:
        fut.set_result(decision)

    decision = checker.start(req, reply)
    return decision if decision is not None else await asyncio.wait_for(fut, 5)


async def _limits(redis: Redis, account: uuid.UUID, **limits: Any) -> None:
    await redis.set(f"pt:risk:a:{account}:lim", Limits.model_validate(limits).model_dump_json())


async def _open_orders(redis: Redis, account: uuid.UUID) -> dict[str, Any]:
    raw = await redis.hgetall(f"pt:risk:a:{account}:open")
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


async def _eventually(check: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


async def test_takeover_after_the_owner_stops_renewing_and_fencing(
    checkers: tuple[RiskChecker, RiskChecker], redis: Redis
) -> None:
    a, b = checkers
    account = uuid.uuid4()
    sym = fresh_symbol()
    await _limits(redis, account, max_position_qty=100)
    first = request(account, sym, "60", limit="10")
    assert (await _decide(a, first)).decision == "approve"
    assert a.owned() == [str(account)]
    owner = (await redis.get(f"pt:risk:own:{account}") or b"").decode()
    assert owner.startswith(a.replica + " ")

    async def written() -> bool:
        return str(first.order_id) in await _open_orders(redis, account)

    assert await _eventually(written)  # written behind, shortly after the answer

    # while A's lease holds, B forwards nothing (no NATS here) and decides nothing for the account
    d = await _decide(b, request(account, sym, "1", limit="10"))
    assert d.decision == "reject" and d.rule == "risk_unavailable" and "ownership" in (d.reason or "")

    # A "dies": it stops renewing. Before its lease could run out it stops deciding by itself ...
    await asyncio.sleep(LEASE * 0.8)
    d = await _decide(a, request(account, sym, "1", limit="10"))
    assert d.decision == "reject" and d.rule == "risk_unavailable"
    # ... and once the lease is gone, B takes it over with A's reservation loaded
    await asyncio.sleep(LEASE * 0.5)
    b.slots.pop(str(account), None)  # forget the owner hint B got while A owned the account
    d = await _decide(b, request(account, sym, "60", limit="10"))
    assert d.decision == "reject" and d.reason == "max_position_qty 100 exceeded: would be 120"
    assert (await _decide(b, request(account, sym, "40", limit="10"))).decision == "approve"
    assert b.owned() == [str(account)]
    fence_a, fence_b = (
        int(owner.split()[1]),
        int((await redis.get(f"pt:risk:own:{account}") or b"").split()[1]),
    )
    assert fence_b > fence_a

    # fencing: A, stalled past its lease but believing it still owns the account, decides once more
    # (as a process paused between its check and its decision would); its write is refused
    a.slots[str(account)].valid_until = time.monotonic() + 60
    stale = request(account, sym, "30", limit="10")
    assert (await _decide(a, stale)).decision == "approve"

    async def lost() -> bool:
        return a.owned() == []

    assert await _eventually(lost)
    await asyncio.sleep(0.05)
    opened = await _open_orders(redis, account)
    assert str(stale.order_id) not in opened
    assert sum(D(o["q"]) for o in opened.values()) == D("100")
    # B still owns the account and decides on the right state
    await b.renew()
    d = await _decide(b, request(account, sym, "1", limit="10"))
    assert d.reason == "max_position_qty 100 exceeded: would be 101"


async def test_redelivered_exec_report_is_applied_once(
    checkers: tuple[RiskChecker, RiskChecker], redis: Redis
) -> None:
    a, _ = checkers
    account = uuid.uuid4()
    sym = fresh_symbol()
    await _limits(redis, account)
    req = request(account, sym, "10", limit="5")
    assert (await _decide(a, req)).decision == "approve"
    fill = ExecReport(
        exec=ExecType.FILL,
        seq=int(time.time() * 1000),
        order_id=req.order_id,
        account_id=account,
        symbol=sym,
        side=req.side,
        t=datetime.now(UTC),
        exec_id=uuid.uuid4().hex,
        price=D("5"),
        qty=D("4"),
        leaves_qty=D("6"),
    )
    # two copies at once (a redelivery while the first is in flight), then one more later
    outcomes = await asyncio.gather(a.apply_exec(fill), a.apply_exec(fill))
    assert sorted(outcomes) == ["applied", "dup"]
    assert await a.apply_exec(fill) == "dup"
    # "applied" means written: Redis has it already
    pos = orjson.loads(await redis.hget(f"pt:risk:a:{account}:pos", sym) or b"{}")
    assert pos == {"q": "4", "a": "5"}
    assert (await _open_orders(redis, account))[str(req.order_id)]["q"] == "6"
    # a new owner (after a restart) still knows the report: the seen key is in Redis
    await a.close()
    assert await checkers[1].apply_exec(fill) == "dup"


async def test_reports_that_change_nothing_are_acked_without_redis_or_a_lease(
    checkers: tuple[RiskChecker, RiskChecker], redis: Redis
) -> None:
    """`accepted` and `triggered` reports (half of what the book publishes) never change risk's state:
    no seen-key lookup, no write, no lease taken for an account nobody owns."""
    a, _ = checkers
    account = uuid.uuid4()
    calls = a.batcher.calls
    for kind in (ExecType.ACCEPTED, ExecType.TRIGGERED):
        report = ExecReport(
            exec=kind,
            seq=int(time.time() * 1000),
            order_id=uuid.uuid4(),
            account_id=account,
            symbol=fresh_symbol(),
            side=Side.BUY,
            t=datetime.now(UTC),
        )
        assert await a.apply_exec(report) == "noop"
    assert a.batcher.calls == calls
    assert await redis.get(f"pt:risk:own:{account}") is None
    assert str(account) not in a.owned()


async def test_redis_down_rejects_with_a_reason_naming_redis(
    checkers: tuple[RiskChecker, RiskChecker],
) -> None:
    a, _ = checkers
    account = uuid.uuid4()
    a.redis_lost("Connection refused")
    d = await _decide(a, request(account, fresh_symbol(), "1"))
    assert d.decision == "reject" and d.rule == "risk_unavailable" and not d.throttled
    assert "Redis unreachable: Connection refused" in (d.reason or "") and "order refused" in (d.reason or "")
    assert "Redis unreachable" in a.health()
    # an account nobody owns, on a replica whose Redis is not there at all
    dead = RiskChecker(LuaBatcher("redis://127.0.0.1:1/0", 0.5), cast(Any, None), "dead", lease=LEASE)
    d = await _decide(dead, request(uuid.uuid4(), fresh_symbol(), "1"))
    assert d.decision == "reject" and d.rule == "risk_unavailable"
    assert "Redis unreachable" in (d.reason or "")


# --- two real replicas ------------------------------------------------------------------------------------


async def _replica(url: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{url}/v1/replica", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def test_forwarding_and_the_array_form(start_services: ServiceStarter, infra: Endpoints) -> None:
    _, url_a = start_services("risk")
    _, url_b = start_services("risk")
    rep_a, rep_b = (await _replica(url_a))["replica"], (await _replica(url_b))["replica"]
    assert rep_a != rep_b
    assert (await _replica(url_a)).keys() >= {"replica", "accounts"}
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(f"{url_a}/v1/replica")).status_code == 401
    nc = await nats.connect(infra.nats_url)
    try:
        x, y, z = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        for account in (x, y, z):
            put_limits(url_a, account, max_order_qty=5)
        sym = fresh_symbol()

        async def ask_at(subject: str, req: RiskCheckRequest) -> RiskDecision:
            msg = await nc.request(subject, codec.encode(req), timeout=5)
            return codec.decode(msg.data, RiskDecision)

        # A owns x, B owns y: each took the lease for what it was asked first
        assert (await ask_at(subjects.risk_own(rep_a), request(x, sym, "1"))).decision == "approve"
        assert (await ask_at(subjects.risk_own(rep_b), request(y, sym, "1"))).decision == "approve"
        assert str(x) in (await _replica(url_a))["accounts"]
        assert str(y) in (await _replica(url_b))["accounts"]
        # asked of the other replica, the check is forwarded: the owner answers and audits it
        fwd = request(x, sym, "6")
        d = await ask_at(subjects.risk_own(rep_b), fwd)
        assert d.decision == "reject" and d.reason == "max_order_qty 5 exceeded: order qty 6"
        async with httpx.AsyncClient(timeout=10) as client:

            async def audited() -> list[Any]:
                r = await client.get(f"{url_a}/v1/decisions", params={"account_id": str(x), "limit": 10})
                return [row for row in r.json() if row["order_id"] == str(fwd.order_id)]

            rows = await _eventually(audited)
        assert rows and rows[0]["replica"] == rep_a
        assert str(x) not in (await _replica(url_b))["accounts"]

        # the array form: mixed accounts (owned by A, by B, by nobody yet), answers in order
        reqs = [
            request(y, sym, "6"),
            request(x, sym, "2"),
            request(z, sym, "9"),
            request(x, sym, "7"),
            request(y, sym, "5"),
            request(z, sym, "1"),
        ]
        for subject in (subjects.RISK_CHECK, subjects.risk_own(rep_a), subjects.risk_own(rep_b)):
            msg = await nc.request(subject, codec.encode(reqs), timeout=5)
            decisions = codec.decode(msg.data, list[RiskDecision])
            assert [d.decision for d in decisions] == [
                "reject",
                "approve",
                "reject",
                "reject",
                "approve",
                "approve",
            ]
            assert decisions[2].reason == "max_order_qty 5 exceeded: order qty 9"
            assert decisions[3].reason == "max_order_qty 5 exceeded: order qty 7"
            reqs = [request(r.account_id, r.symbol, str(r.qty)) for r in reqs]  # new order ids
        owned_a = set((await _replica(url_a))["accounts"])
        owned_b = set((await _replica(url_b))["accounts"])
        assert not owned_a & owned_b and {str(x), str(y), str(z)} <= owned_a | owned_b

        # a limits change reaches the owner before the PUT returns, whichever replica took it
        put_limits(url_b, x, max_order_qty=1)
        d = await ask_at(subjects.RISK_CHECK, request(x, sym, "2"))
        assert d.reason == "max_order_qty 1 exceeded: order qty 2"
    finally:
        await nc.close()


async def test_writes_list_the_account_and_keep_the_rate_bucket_expiring(
    checkers: tuple[RiskChecker, RiskChecker], redis: Redis
) -> None:
    """An owner lists the account (`accounts`) once per lease and refreshes the rate bucket's expiry
    now and then, not on every write; a new lease (after Redis lost the keys) lists it again."""
    a, _ = checkers
    account = uuid.uuid4()
    sym = fresh_symbol()
    await _limits(redis, account, max_orders_per_second=1000)
    for _ in range(3):
        assert (await _decide(a, request(account, sym, "1", limit="10"))).decision == "approve"
        await a.write_audit()  # flushes the state changes too

    async def listed() -> bool:
        return bool(await redis.sismember("pt:risk:accounts", str(account)))

    assert await _eventually(listed)
    assert 3000 < await redis.ttl(f"pt:risk:a:{account}:rate") <= 3600
    # Redis loses the account's keys (a flush, a restart without persistence): the owner's next
    # write is refused by the fence, the account is taken again and listed again
    await redis.delete(
        "pt:risk:accounts", f"pt:risk:own:{account}", f"pt:risk:a:{account}:rate", f"pt:risk:a:{account}:open"
    )
    await _decide(a, request(account, sym, "1", limit="10"))  # decided from memory, write refused
    await a.write_audit()

    async def owned_again() -> bool:
        d = await _decide(a, request(account, sym, "1", limit="10"))
        await a.write_audit()
        return d.decision == "approve" and await listed()

    assert await _eventually(owned_again)
    assert 3000 < await redis.ttl(f"pt:risk:a:{account}:rate") <= 3600
