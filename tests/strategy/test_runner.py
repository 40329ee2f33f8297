"""The strategy-runner service and the strategy container, against real NATS, Postgres, Redis and a
real broker process: deploy / status / stop / start / resume after a restart, bad deployments, a
strategy that raises, and the container's clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from papertrade import codec
from papertrade.bus import subjects
from papertrade.bus.connect import connect_nats
from papertrade.bus.streams import MD_STREAM, ensure_streams
from papertrade.enums import Interval
from papertrade.models import Bar
from papertrade.stack.infra import Endpoints, create_database
from papertrade.stack.launch import launch
from papertrade.stack.procs import ManagedProcess
from papertrade_strategy_runner.container import ConfigError, ContainerConfig
from tests.conftest import ADMIN_TOKEN, REPO

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class _Services:
    """Service processes for this module (started once: they take seconds each)."""

    def __init__(self, infra: Endpoints, log_dir: Path) -> None:
        self.infra = infra
        self.log_dir = log_dir
        self.procs: list[ManagedProcess] = []
        self.db = create_database(infra.database_url, f"t_strat_{uuid.uuid4().hex[:10]}")

    def start(self, name: str, **extra: str) -> tuple[ManagedProcess, str]:
        base = {**self.infra.env(), "PAPERTRADE_ADMIN_TOKEN": ADMIN_TOKEN, "DATABASE_URL": self.db, **extra}
        proc, url = launch(name, base, self.log_dir, timeout=120)
        self.procs.append(proc)
        return proc, url

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def stack(infra: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A broker and a strategy-runner on a fresh database (the runner can import tests.*)."""
    services = _Services(infra, tmp_path_factory.mktemp("strategy-logs"))
    try:
        _, broker = services.start("broker")
        proc, runner = services.start("strategy-runner", PYTHONPATH=str(REPO), BROKER_URL=broker)
        yield {"broker": broker, "runner": runner, "runner_proc": proc, "services": services}
    finally:
        services.close()


def _account(broker: str) -> dict[str, Any]:
    r = httpx.post(f"{broker}/admin/accounts", json={"name": "strat", "cash": "100000"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _symbol() -> str:
    return "Z" + uuid.uuid4().hex[:5].upper().replace("0", "A").replace("1", "B")


class BarFeed:
    """Publishes 1m bars of one symbol on NATS (and the MD stream), a minute apart."""

    def __init__(self, infra: Endpoints, symbol: str) -> None:
        self.url = infra.nats_url
        self.symbol = symbol
        self.t = datetime(2024, 1, 2, 15, 0, tzinfo=UTC)

    def publish(self, n: int = 1) -> None:
        asyncio.run(self._publish(n))

    async def _publish(self, n: int) -> None:
        nc = await connect_nats(self.url, "test-feed")
        try:
            await ensure_streams(nc.jetstream(), (MD_STREAM,))
            for _ in range(n):
                px = Decimal("100") + Decimal(self.t.minute) / 100
                bar = Bar(
                    symbol=self.symbol, interval=Interval.M1, t=self.t, o=px, h=px, l=px, c=px, v=Decimal(10)
                )
                await nc.publish(subjects.md_bar(Interval.M1, self.symbol), codec.encode(bar))
                self.t += timedelta(minutes=1)
            await nc.flush()
        finally:
            await nc.close()


def _wait(check: Callable[[], Any], what: str, timeout: float = 30.0, feed: BarFeed | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        if feed is not None:
            feed.publish(1)
        time.sleep(0.3)
    raise AssertionError(f"{what}: not reached in {timeout}s (last: {last})")


def _status(runner: str, sid: str) -> dict[str, Any]:
    r = httpx.get(f"{runner}/v1/strategies/{sid}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _deploy(runner: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{runner}/v1/strategies", json=body, headers=ADMIN if headers is None else headers, timeout=30
    )


def test_deploy_stop_start_and_resume_after_restart(stack: dict[str, Any], infra: Endpoints) -> None:
    broker, runner = stack["broker"], stack["runner"]
    acct = _account(broker)
    symbol = _symbol()
    feed = BarFeed(infra, symbol)
    body = {
        "name": "buyer",
        "entrypoint": "tests.strategy.strategies:BuyEveryBar",
        "params": {},
        "symbols": [symbol],
        "interval": "1m",
        "account_id": acct["id"],
    }
    r = _deploy(runner, body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "running" and uuid.UUID(created["id"])
    sid = created["id"]

    listed = {d["id"]: d for d in httpx.get(f"{runner}/v1/strategies").json()}
    assert listed[sid]["entrypoint"] == body["entrypoint"]

    st = _wait(
        lambda: (s := _status(runner, sid))["bars_seen"] >= 2 and s, "bars reach the strategy", feed=feed
    )
    assert st["status"] == "running"
    st = _wait(lambda: (s := _status(runner, sid))["orders_sent"] >= 2 and s, "orders sent", feed=feed)
    for key in (
        "id",
        "name",
        "entrypoint",
        "status",
        "bars_seen",
        "orders_sent",
        "fills",
        "pnl",
        "last_error",
    ):
        assert key in st

    r = httpx.post(f"{runner}/v1/strategies/{sid}/stop", headers=ADMIN, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "stopped"
    seen = r.json()["bars_seen"]
    feed.publish(3)
    time.sleep(1.0)
    assert _status(runner, sid)["bars_seen"] == seen
    assert _status(runner, sid)["status"] == "stopped"

    r = httpx.post(f"{runner}/v1/strategies/{sid}/start", headers=ADMIN, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "running"
    _wait(lambda: _status(runner, sid)["bars_seen"] > seen, "bars after start", feed=feed)

    # restart the runner: the deployment resumes, its counters carry on
    before = _status(runner, sid)
    stack["runner_proc"].stop()
    proc2, runner2 = stack["services"].start("strategy-runner", PYTHONPATH=str(REPO), BROKER_URL=broker)
    stack["runner_proc"], stack["runner"] = proc2, runner2
    after = _wait(
        lambda: (s := httpx.get(f"{runner2}/v1/strategies/{sid}").json()) and s, "deployment listed"
    )
    assert after["bars_seen"] >= before["bars_seen"]
    _wait(
        lambda: (s := _status(runner2, sid))["status"] == "running" and s["bars_seen"] > before["bars_seen"],
        "resumed and receiving bars",
        feed=feed,
    )

    r = httpx.delete(f"{runner2}/v1/strategies/{sid}", headers=ADMIN, timeout=30)
    assert r.status_code == 204
    assert httpx.get(f"{runner2}/v1/strategies/{sid}").status_code == 404
    assert all(d["id"] != sid for d in httpx.get(f"{runner2}/v1/strategies").json())


def test_bad_deployments_are_422_and_change_nothing(stack: dict[str, Any]) -> None:
    broker, runner = stack["broker"], stack["runner"]
    acct = _account(broker)
    good = {
        "name": "x",
        "entrypoint": "papertrade.samples.sma_cross:SmaCross",
        "params": {"fast": 5, "slow": 20},
        "symbols": ["AAPL"],
        "interval": "1m",
        "account_id": acct["id"],
    }
    cases = {
        "does not import": ({"entrypoint": "no_such_module_xyz:Strategy"}, "cannot import"),
        "missing class": ({"entrypoint": "papertrade.samples.sma_cross:Nope"}, "has no attribute"),
        "not a strategy": ({"entrypoint": "tests.strategy.strategies:NotAStrategy"}, "not a subclass"),
        "unknown param": ({"params": {"fastest": 3}}, "unknown param"),
        "wrong param type": ({"params": {"fast": "quick"}}, "must be an integer"),
        "params rejected by the strategy": ({"params": {"fast": 30, "slow": 10}}, "fast < slow"),
        "unknown account": ({"account_id": str(uuid.uuid4())}, "unknown account"),
        "bad symbol": ({"symbols": ["not a symbol!"]}, "symbol"),
        "bad interval": ({"interval": "7m"}, "interval"),
        "no symbols": ({"symbols": []}, "symbols"),
    }
    for label, (change, needle) in cases.items():
        r = _deploy(runner, {**good, **change})
        assert r.status_code == 422, (label, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"code", "message"} and body["code"] == 42210000, (label, body)
        assert needle in body["message"], (label, body["message"])
    r = _deploy(runner, good, headers={})
    assert r.status_code == 401
    assert all(d["name"] != "x" for d in httpx.get(f"{runner}/v1/strategies").json())
    assert httpx.post(f"{runner}/v1/strategies/{uuid.uuid4()}/stop", headers=ADMIN).status_code == 404


def test_a_strategy_that_raises_is_paused_and_reported(stack: dict[str, Any], infra: Endpoints) -> None:
    broker, runner = stack["broker"], stack["runner"]
    acct = _account(broker)
    symbol = _symbol()
    feed = BarFeed(infra, symbol)
    body = {
        "name": "explodes",
        "entrypoint": "tests.strategy.strategies:Explodes",
        "symbols": [symbol],
        "account_id": acct["id"],
    }
    sid = _deploy(runner, body).json()["id"]
    st = _wait(lambda: (s := _status(runner, sid))["status"] == "error" and s, "error reported", feed=feed)
    assert "boom on bar 2" in st["last_error"]
    assert st["bars_seen"] == 2
    feed.publish(2)
    time.sleep(1.0)
    assert _status(runner, sid)["bars_seen"] == 2  # paused: no more callbacks
    httpx.delete(f"{runner}/v1/strategies/{sid}", headers=ADMIN, timeout=30)


def test_samples_are_listed(stack: dict[str, Any]) -> None:
    r = httpx.get(f"{stack['runner']}/v1/samples")
    assert r.status_code == 200
    names = {s["name"]: s for s in r.json()}
    assert set(names) >= {"buy-and-hold", "sma-crossover", "mean-reversion", "breakout-stop"}
    for s in names.values():
        assert s["entrypoint"].startswith("papertrade.samples.") and s["description"]


@pytest.fixture
def container_env(stack: dict[str, Any], infra: Endpoints) -> Iterator[dict[str, str]]:
    acct = _account(stack["broker"])
    yield {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "STRATEGY_ENTRYPOINT": "papertrade.samples.sma_cross:SmaCross",
        "STRATEGY_PARAMS": json.dumps({"fast": 3, "slow": 5}),
        "STRATEGY_SYMBOLS": _symbol(),
        "STRATEGY_INTERVAL": "1m",
        "APCA_API_KEY_ID": acct["api_key_id"],
        "APCA_API_SECRET_KEY": acct["api_secret_key"],
        "BROKER_URL": stack["broker"],
        "NATS_URL": infra.nats_url,
    }


def test_container_runs_and_exits_cleanly_on_sigterm(container_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "papertrade_strategy_runner.container"],
        env=container_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        status = json.loads(line)["pt_status"]
        assert status["status"] == "running" and status["entrypoint"] == container_env["STRATEGY_ENTRYPOINT"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        final = json.loads(out.strip().splitlines()[-1])["pt_status"]
        assert final["status"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_container_config_from_env(container_env: dict[str, str]) -> None:
    config = ContainerConfig.from_env(container_env)
    assert config.params == {"fast": 3, "slow": 5} and config.interval is Interval.M1
    assert config.symbols == (container_env["STRATEGY_SYMBOLS"],)
    for change, needle in (
        ({"STRATEGY_ENTRYPOINT": ""}, "STRATEGY_ENTRYPOINT"),
        ({"STRATEGY_PARAMS": "{not json"}, "STRATEGY_PARAMS"),
        ({"STRATEGY_PARAMS": "[1]"}, "JSON object"),
        ({"STRATEGY_SYMBOLS": ""}, "STRATEGY_SYMBOLS"),
        ({"STRATEGY_SYMBOLS": "no good!"}, "STRATEGY_SYMBOLS"),
        ({"STRATEGY_INTERVAL": "2m"}, "STRATEGY_INTERVAL"),
        ({"APCA_API_KEY_ID": ""}, "APCA_API_KEY_ID"),
    ):
        with pytest.raises(ConfigError, match=needle):
            ContainerConfig.from_env({**container_env, **change})


def test_container_refuses_a_bad_configuration(container_env: dict[str, str]) -> None:
    for change, needle in (
        ({"STRATEGY_ENTRYPOINT": "nope.nope:Nope"}, "cannot import"),
        ({"APCA_API_SECRET_KEY": "wrong"}, "key pair"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "papertrade_strategy_runner.container"],
            env={**container_env, **change},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, (change, r.stderr)
        assert needle in r.stderr, (change, r.stderr)
