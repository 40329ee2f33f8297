"""Broker test harness: one real broker process per module on its own database, a fake exchange."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from papertrade import keys
from papertrade.stack.infra import Endpoints, create_database
from papertrade.stack.launch import launch
from tests.broker.fakes import FakeExchange
from tests.conftest import ADMIN_TOKEN

SYMBOLS = ["AAPL", "MSFT", "TSLA", "RISKY", "THROT", "CLIP", "CLIPN", "QUIET", "BRK.B", "@BTCUSD"]
PRICES = {
    "AAPL": "100",
    "MSFT": "200",
    "TSLA": "50",
    "RISKY": "10",
    "THROT": "10",
    "CLIP": "10",
    "CLIPN": "10",
    "QUIET": "10",
}
PRICES |= {"BRK.B": "400", "@BTCUSD": "30000"}


@dataclass
class Broker:
    url: str
    database_url: str
    exchange: FakeExchange
    redis_url: str
    log: Path
    #: the broker process (its ledger process is its child)
    pid: int | None = None

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)

    def new_account(self, cash: str = "100000", **extra: Any) -> dict[str, Any]:
        with self.admin() as c:
            r = c.post("/admin/accounts", json={"name": f"t-{uuid.uuid4().hex[:6]}", "cash": cash, **extra})
            assert r.status_code == 201, r.text
            data: dict[str, Any] = r.json()
            return data

    def client(self, account: dict[str, Any]) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=key_headers(account), timeout=10)

    def set_price(self, symbol: str, price: str) -> None:
        self.exchange.prices[symbol] = Decimal(price)
        r = redis.Redis.from_url(self.redis_url)
        r.set(keys.last_trade(symbol), orjson.dumps({"price": price, "t": "2030-01-01T00:00:00Z"}))
        r.close()


def key_headers(account: dict[str, Any]) -> dict[str, str]:
    """The API key headers of an account as the admin API created it."""
    return {"APCA-API-KEY-ID": account["api_key_id"], "APCA-API-SECRET-KEY": account["api_secret_key"]}


def real_exchange(
    start_services: Any, redis_url: str, database_url: str, sym: str, price: str
) -> tuple[str, str]:
    """The real risk and orderbook (no synthetic liquidity) on `database_url`, `sym` in the watchlist
    with a last trade at `price` (the book opens its book): (risk's URL, a tag for durable names)."""
    r = redis.Redis.from_url(redis_url)
    raw = r.get(keys.WATCHLIST)
    current = orjson.loads(raw) if raw else {"symbols": [], "intervals": ["1m"]}
    r.set(keys.WATCHLIST, orjson.dumps({**current, "symbols": [*current.get("symbols", []), sym]}))
    r.set(keys.last_trade(sym), orjson.dumps({"price": price, "t": "2030-01-01T00:00:00Z"}))
    r.close()
    tag = uuid.uuid4().hex[:8]
    _, risk_url = start_services("risk", database_url=database_url, RISK_DURABLE=f"risk-{tag}")
    start_services(
        "orderbook",
        database_url=database_url,
        ORDERBOOK_LIQUIDITY_ENABLED="false",
        ORDERBOOK_WATCHLIST_POLL_SECONDS="0.2",
    )
    return risk_url, tag


def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (no timing assertions: a generous bound)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value {value!r}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def exchange(infra: Endpoints) -> Iterator[FakeExchange]:
    ex = FakeExchange(infra.nats_url).start()
    ex.prices.update({s: Decimal(p) for s, p in PRICES.items()})
    ex.risk_mode.update({"RISKY": "reject", "THROT": "throttle", "CLIP": "clip", "QUIET": "silent"})
    ex.risk_mode["CLIPN"] = "clip_notional"
    yield ex
    ex.stop()


@pytest.fixture(scope="module")
def broker(
    infra: Endpoints, exchange: FakeExchange, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    r = redis.Redis.from_url(infra.redis_url)
    r.set(keys.WATCHLIST, orjson.dumps({"symbols": SYMBOLS, "intervals": ["1m"]}))
    for s, p in PRICES.items():
        r.set(keys.last_trade(s), orjson.dumps({"price": p, "t": "2030-01-01T00:00:00Z"}))
    r.close()
    db = create_database(infra.database_url, f"broker_{uuid.uuid4().hex[:10]}")
    base = {
        **infra.env(),
        "DATABASE_URL": db,
        "PAPERTRADE_ADMIN_TOKEN": ADMIN_TOKEN,
        "LOG_LEVEL": "INFO",
        "BROKER_LEDGER_DURABLE": f"broker-test-{uuid.uuid4().hex[:8]}",
        "BROKER_RISK_TIMEOUT": "0.5",
    }
    logs = tmp_path_factory.mktemp("broker-logs")
    proc, url = launch("broker", base, logs)
    try:
        yield Broker(url, db, exchange, infra.redis_url, logs / "broker.log", proc.pid)
    finally:
        proc.stop()
