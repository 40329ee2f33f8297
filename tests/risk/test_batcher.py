"""The risk script's own Redis connection (`LuaBatcher`): batching, recovery, deadlines, databases."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from redis.asyncio import Redis

from papertrade import codec
from papertrade.enums import OrderType, Side, TimeInForce
from papertrade.keys import RISK_PREFIX
from papertrade.messages import RiskCheckRequest
from papertrade.risk import APPROVE
from papertrade.stack.infra import Endpoints
from papertrade_risk.engine import AuditRecord
from papertrade_risk.store import (
    ACCOUNTS,
    LOG,
    LuaBatcher,
    account_key,
    audit_item,
    log_key,
    seen_key,
    write_entry,
    write_item,
)


def _record(account: str, qty: int) -> bytes:
    """A decision record as the audit keeps it."""
    req = RiskCheckRequest(
        order_id=uuid.uuid4(),
        account_id=uuid.UUID(account),
        symbol="AAPL",
        side=Side.BUY,
        type=OrderType.MARKET,
        time_in_force=TimeInForce.DAY,
        t=datetime.now(UTC),
        qty=Decimal(qty),
    )
    return codec.encode(AuditRecord(at=time.time(), replica="r1", request=req, decision=APPROVE))


def _other_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture
async def batcher(infra: Endpoints) -> AsyncIterator[LuaBatcher]:
    b = LuaBatcher(infra.redis_url, 2.0)
    yield b
    await b.close()


async def test_concurrent_items_share_one_call(batcher: LuaBatcher) -> None:
    account = str(uuid.uuid4())
    items = [orjson.dumps({"op": "who", "a": account}) for _ in range(50)]
    calls = batcher.calls
    results = await asyncio.gather(*(batcher.call(item) for item in items))
    assert all(r[0] == "who" for r in results)
    assert batcher.calls - calls <= 2  # the first call alone, the other 49 in the next one


async def test_argument_items_and_json_ops_share_one_call(batcher: LuaBatcher, infra: Endpoints) -> None:
    """The write-behind's `W` and `A` items are read argument by argument, next to JSON ops."""
    owned, fenced = str(uuid.uuid4()), str(uuid.uuid4())
    redis = Redis.from_url(infra.redis_url)
    await redis.set(f"{RISK_PREFIX}own:{owned}", b"r1 7")
    await redis.set(f"{RISK_PREFIX}own:{fenced}", b"r2 8")
    seen = seen_key(f"T{owned[:8]}", 1)
    write = write_item(
        [
            write_entry(owned, "r1 7", ["o1", '{"q":"5"}', "o0", ""], ["AAPL", '{"q":"3"}'], "d1", [seen],
                        ("4.000000", "12.5", True), True),
            write_entry(fenced, "r1 9", ["o2", '{"q":"1"}'], [], "", [], None, False),
        ]
    )  # fmt: skip
    recs = [_record(owned, n) for n in (1, 2, 3)]
    audit = audit_item([(owned, recs[0]), (fenced, recs[1]), (owned, recs[2])])
    try:
        await redis.hset(account_key(owned, "open"), "o0", "x")
        results = await asyncio.gather(
            batcher.call(write),
            batcher.call(orjson.dumps({"op": "who", "a": owned})),
            batcher.call(audit),
        )
        assert results[0] == ["w", ["ok", "fenced"]]
        assert results[1][:2] == ["who", "r1 7"]
        assert results[2] == ["log", 3]
        assert await redis.hgetall(account_key(owned, "open")) == {b"o1": b'{"q":"5"}'}
        assert await redis.hgetall(account_key(owned, "pos")) == {b"AAPL": b'{"q":"3"}'}
        assert await redis.get(account_key(owned, "day")) == b"d1"
        assert await redis.exists(seen) == 1
        assert await redis.hgetall(account_key(owned, "rate")) == {b"n": b"4.000000", b"t": b"12.5"}
        assert 0 < await redis.ttl(account_key(owned, "rate")) <= 3600
        assert await redis.sismember(ACCOUNTS, owned)
        assert await redis.exists(account_key(fenced, "open")) == 0  # another token: nothing written
        assert await redis.lrange(log_key(owned), 0, -1) == [recs[2], recs[0]]
        assert await redis.lrange(log_key(fenced), 0, -1) == [recs[1]]
        assert [r for r in await redis.lrange(LOG, 0, 999) if r in recs] == recs[::-1]
    finally:
        keys = [account_key(a, n) for a in (owned, fenced) for n in ("open", "pos", "day", "rate")]
        keys += [
            seen,
            log_key(owned),
            log_key(fenced),
            f"{RISK_PREFIX}own:{owned}",
            f"{RISK_PREFIX}own:{fenced}",
        ]
        await redis.delete(*keys)
        for rec in recs:
            await redis.lrem(LOG, 0, rec.decode())
        await redis.srem(ACCOUNTS, owned)
        await redis.aclose()


async def test_scripts_flushed_in_redis_are_loaded_again(batcher: LuaBatcher, infra: Endpoints) -> None:
    assert (await batcher.call(orjson.dumps({"op": "live", "a": ""})))[0] == "live"
    redis = Redis.from_url(infra.redis_url)
    try:
        await redis.script_flush()
    finally:
        await redis.aclose()
    assert (await batcher.call(orjson.dumps({"op": "live", "a": ""})))[0] == "live"


async def test_a_silent_server_times_out_and_the_next_call_reconnects(infra: Endpoints) -> None:
    # a listener that accepts and never answers stands in for a hung Redis
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    b = LuaBatcher(f"redis://127.0.0.1:{port}/0", 0.3)
    try:
        with pytest.raises(TimeoutError, match=r"Redis did not answer within 0\.3s"):
            await b.call(orjson.dumps({"op": "live", "a": ""}))
        b._where = LuaBatcher(infra.redis_url)._where  # Redis is back (same batcher, new address)
        assert (await b.call(orjson.dumps({"op": "live", "a": ""})))[0] == "live"
    finally:
        await b.close()
        silent.close()


async def test_a_refused_connection_fails_the_call_with_the_reason() -> None:
    b = LuaBatcher("redis://127.0.0.1:1/0", 0.5)
    with pytest.raises(OSError, match=r"[Cc]onnect"):
        await b.call(orjson.dumps({"op": "live", "a": ""}))


async def test_the_url_database_is_selected(infra: Endpoints) -> None:
    account = str(uuid.uuid4())
    url = _other_db(infra.redis_url, 3)
    b = LuaBatcher(url)
    redis = Redis.from_url(url)
    try:
        limits = orjson.dumps({"max_order_qty": "5"}).decode()
        assert (await b.call(orjson.dumps({"op": "l", "a": account, "lim": limits, "nx": False})))[0] == "ok"
        assert await redis.get(account_key(account, "lim")) == limits.encode()
    finally:
        await redis.delete(account_key(account, "lim"))
        await redis.aclose()
        await b.close()
