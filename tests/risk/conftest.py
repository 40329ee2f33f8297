"""Fixtures of the risk service tests: a real risk process, a NATS client, a Redis client."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from redis.asyncio import Redis

from papertrade import codec
from papertrade.bus import subjects
from papertrade.enums import OrderType, Side, TimeInForce
from papertrade.messages import RiskCheckRequest, RiskDecision
from papertrade.stack.infra import Endpoints
from papertrade.stack.launch import launch
from papertrade.stack.procs import ManagedProcess
from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def start_risk(env: dict[str, str], log_dir: Path) -> tuple[ManagedProcess, str]:
    """One risk process on a free port, ready."""
    return launch("risk", {"PAPERTRADE_ADMIN_TOKEN": ADMIN_TOKEN, "LOG_LEVEL": "INFO", **env}, log_dir)


@pytest.fixture(scope="module")
def risk_url(infra: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_risk(infra.env(), tmp_path_factory.mktemp("risk-logs"))
    yield url
    proc.stop()


@pytest.fixture
async def nc(infra: Endpoints) -> AsyncIterator[NATS]:
    client = await nats.connect(infra.nats_url)
    yield client
    await client.close()


@pytest.fixture
async def redis(infra: Endpoints) -> AsyncIterator[Redis]:
    client = Redis.from_url(infra.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def account() -> uuid.UUID:
    return uuid.uuid4()


def fresh_symbol() -> str:
    """A symbol no other test uses (its marks start empty)."""
    return "T" + uuid.uuid4().hex[:6].upper()


def request(
    account: uuid.UUID,
    symbol: str,
    qty: str | None = "10",
    side: Side = Side.BUY,
    limit: str | None = None,
    replaces: uuid.UUID | None = None,
    t: datetime | None = None,
) -> RiskCheckRequest:
    return RiskCheckRequest(
        order_id=uuid.uuid4(),
        account_id=account,
        symbol=symbol,
        side=side,
        type=OrderType.LIMIT if limit is not None else OrderType.MARKET,
        time_in_force=TimeInForce.DAY,
        t=t or datetime.now(UTC),
        qty=None if qty is None else Decimal(qty),
        limit_price=None if limit is None else Decimal(limit),
        replaces=replaces,
    )


async def ask(nc: NATS, req: RiskCheckRequest, timeout: float = 5.0) -> RiskDecision:
    """One risk.check round trip. A moment with no responder (a replica's NATS link reconnecting on a
    loaded machine) is waited out for up to `timeout`; the broker itself fails closed then."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            msg = await nc.request(subjects.RISK_CHECK, codec.encode(req), timeout=timeout)
            return codec.decode(msg.data, RiskDecision)
        except NoRespondersError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def put_limits(url: str, account: uuid.UUID, **limits: Any) -> httpx.Response:
    r = httpx.put(f"{url}/v1/limits/{account}", json=limits, headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return r
