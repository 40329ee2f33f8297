"""The risk script's own Redis connection (`LuaBatcher`): batching, recovery, deadlines, databases."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
from redis.asyncio import Redis

from papertrade.stack.infra import Endpoints
from papertrade_risk.store import LuaBatcher, account_key


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
