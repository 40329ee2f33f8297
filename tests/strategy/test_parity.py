"""Live/backtest parity: the same strategy over the same bars gives the same orders and fills in the
backtester and in the running stack (streamer -> orderbook with its synthetic liquidity, risk, broker,
and the strategy as its own container process).

The streamer runs the seeded synthetic market accelerated (a minute of bars every two seconds of wall
time), so every order of bar t reaches the book before the maker re-quotes on bar t+1, as in bar time,
even on a loaded machine (at a bar a second, a heavily loaded run once missed that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from papertrade.backtest import run_backtest
from papertrade.bars import generate
from papertrade.stack.infra import Endpoints, create_database
from papertrade.stack.launch import service_env, service_url, start_service, wait_ready
from papertrade.stack.procs import ManagedProcess, free_port
from papertrade.stack.services import spec
from tests.conftest import ADMIN_TOKEN, REPO
from tests.strategy.strategies import ParityProbe

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
START = datetime(2024, 3, 4, 14, 30, tzinfo=UTC)  # a Monday's open
BARS = 22
SEED = 7
# Enough that no order of the probe is refused for buying power whatever price the random symbol
# draws ($10..$500 in 2020, more since): the broker answers such a refusal with a 403 and lists no
# order, the backtest records a rejected one, so a refusal would make the two lists differ in shape.
CASH = "1000000"


@pytest.fixture(scope="module")
def stack(infra: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    symbol = "PY" + uuid.uuid4().hex[:4].upper().replace("0", "Q").replace("1", "R")
    db = create_database(infra.database_url, f"t_parity_{uuid.uuid4().hex[:10]}")
    logs = tmp_path_factory.mktemp("parity-logs")
    procs: list[ManagedProcess] = []
    ports = {s.name: free_port() for s in (spec("streamer"), spec("orderbook"), spec("risk"), spec("broker"))}
    base = {
        **infra.env(),
        "PAPERTRADE_ADMIN_TOKEN": ADMIN_TOKEN,
        "DATABASE_URL": db,
        "STREAMER_SYMBOLS": symbol,
        "STREAMER_INTERVALS": "1m",
        "STREAMER_SEED": str(SEED),
        "STREAMER_AUTOSTART": "false",
        "STREAMER_MODE": "accelerated",
        "STREAMER_START": START.isoformat(),
    }
    urls = {}
    try:
        for name in ("streamer", "orderbook", "risk", "broker"):
            s = spec(name)
            env = service_env(s, base, ports)
            proc = start_service(s, env, logs)
            procs.append(proc)
            urls[name] = service_url(s, env)
        for proc, name in zip(procs, ("streamer", "orderbook", "risk", "broker"), strict=True):
            wait_ready(proc, urls[name], timeout=120)
        yield {"symbol": symbol, "urls": urls, "infra": infra}
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_same_strategy_same_bars_same_orders_and_fills(stack: dict[str, Any]) -> None:
    urls, symbol, infra = stack["urls"], stack["symbol"], stack["infra"]
    acct = httpx.post(
        f"{urls['broker']}/admin/accounts", json={"name": "parity", "cash": CASH}, headers=ADMIN
    )
    assert acct.status_code == 201, acct.text
    keys = acct.json()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "STRATEGY_ENTRYPOINT": "tests.strategy.strategies:ParityProbe",
        "STRATEGY_SYMBOLS": symbol,
        "STRATEGY_INTERVAL": "1m",
        "APCA_API_KEY_ID": keys["api_key_id"],
        "APCA_API_SECRET_KEY": keys["api_secret_key"],
        "BROKER_URL": urls["broker"],
        "NATS_URL": infra.nats_url,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "papertrade_strategy_runner.container"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())  # subscribed and running
        end = START + timedelta(minutes=BARS)
        r = httpx.post(
            f"{urls['streamer']}/admin/run",
            json={"mode": "accelerated", "start": START.isoformat(), "end": end.isoformat(), "speed": 30},
            headers=ADMIN,
        )
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if httpx.get(f"{urls['streamer']}/v1/status").json().get("status") == "finished":
                break
            time.sleep(0.5)
        time.sleep(3.0)  # the last orders' executions reach the broker
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    statuses = [json.loads(line)["pt_status"] for line in out.splitlines() if line.startswith("{")]
    assert statuses[-1]["bars_seen"] == BARS and statuses[-1]["last_error"] is None, statuses[-1]
    h = {"APCA-API-KEY-ID": keys["api_key_id"], "APCA-API-SECRET-KEY": keys["api_secret_key"]}

    def live() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        orders = httpx.get(
            f"{urls['broker']}/v2/orders",
            params={"status": "all", "direction": "asc", "limit": 500},
            headers=h,
        ).json()
        fills = httpx.get(
            f"{urls['broker']}/v2/account/activities/FILL", params={"direction": "asc"}, headers=h
        ).json()
        return orders, fills

    # the broker books executions asynchronously: wait until every order is final and booked
    deadline = time.monotonic() + 30
    live_orders, live_fills = live()
    while time.monotonic() < deadline:
        booked = sum(Decimal(f["qty"]) for f in live_fills)
        if all(o["status"] in ("filled", "canceled") for o in live_orders) and booked == sum(
            Decimal(o["filled_qty"]) for o in live_orders
        ):
            break
        time.sleep(0.5)
        live_orders, live_fills = live()

    bars = generate(symbol, START, START + timedelta(minutes=BARS - 1), seed=SEED)
    result = run_backtest(ParityProbe(), [bars], cash=CASH)
    assert result.error is None

    def order_key(o: dict[str, Any]) -> tuple[Any, ...]:
        return (
            o["side"],
            o["type"],
            Decimal(o["qty"]),
            o["limit_price"] and Decimal(o["limit_price"]),
            o["status"],
            Decimal(o["filled_qty"]),
        )

    backtest_orders = [
        (o.side.value, o.type.value, o.qty, o.limit_price, o.status.value, o.filled_qty)
        for o in result.raw.orders
    ]
    got = [order_key(o) for o in live_orders]
    assert got == backtest_orders, f"live {got}\nbacktest {backtest_orders}\nlive fills {live_fills}"
    live = [(f["side"], Decimal(f["qty"]), Decimal(f["price"])) for f in live_fills]
    assert live == [(f.side.value, f.qty, f.price) for f in result.raw.fills]
    assert len(result.raw.fills) >= 5
