"""The demo hook `make up` runs: a demo account through the real broker, created once, then reused."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx

from papertrade.stack.demo import DEMO_ACCOUNT_FILE, DEMO_STRATEGY, DemoContext, run_demo
from tests.conftest import ADMIN_TOKEN, ServiceStarter


def test_demo_account_is_created_once_and_trades_with_its_keys(
    start_services: ServiceStarter, fresh_database_url: str, tmp_path: Path
) -> None:
    _, broker = start_services("broker", database_url=fresh_database_url)
    ctx = DemoContext({"broker": broker}, ADMIN_TOKEN, tmp_path)
    first = run_demo(ctx)
    assert first.skipped == ["demo strategy: this stack runs no strategy-runner"]
    assert set(first.env) >= {"APCA_API_KEY_ID", "APCA_API_SECRET_KEY"}
    assert any("created" in note for note in first.notes)
    saved = tmp_path / DEMO_ACCOUNT_FILE
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["api_key_id"] == first.env["APCA_API_KEY_ID"]

    headers = {
        "APCA-API-KEY-ID": first.env["APCA_API_KEY_ID"],
        "APCA-API-SECRET-KEY": first.env["APCA_API_SECRET_KEY"],
    }
    account = httpx.get(f"{broker}/v2/account", headers=headers, timeout=10)
    assert account.status_code == 200, account.text
    assert account.json()["status"] == "ACTIVE"

    second = run_demo(ctx)
    assert second.env == first.env
    assert any("reused" in note for note in second.notes)
    listing = httpx.get(
        f"{broker}/admin/accounts", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ).json()
    assert len([a for a in listing if a["name"] == "demo"]) == 1


def test_demo_is_skipped_with_the_reason_when_the_broker_cannot_do_it(
    start_services: ServiceStarter, tmp_path: Path
) -> None:
    _, risk = start_services("risk")  # a service without /admin/accounts stands in for an old broker
    result = run_demo(DemoContext({"broker": risk}, ADMIN_TOKEN, tmp_path))
    assert result.env == {}
    assert result.skipped and "does not serve GET /admin/accounts" in result.skipped[0]

    assert run_demo(DemoContext({}, ADMIN_TOKEN, tmp_path)).skipped == [
        "demo account: this stack runs no broker"
    ]
    nobody = run_demo(DemoContext({"broker": "http://127.0.0.1:9"}, ADMIN_TOKEN, tmp_path))
    assert nobody.env == {} and nobody.skipped and "ConnectError" in nobody.skipped[0]


def test_demo_deploys_the_sma_sample_once_on_the_demo_account(
    start_services: ServiceStarter, fresh_database_url: str, tmp_path: Path
) -> None:
    _, broker = start_services("broker", database_url=fresh_database_url)
    _, runner = start_services("strategy-runner", database_url=fresh_database_url, BROKER_URL=broker)
    ctx = DemoContext({"broker": broker, "strategy-runner": runner}, ADMIN_TOKEN, tmp_path)
    first = run_demo(ctx)
    assert not first.skipped, first.skipped
    assert any("demo strategy" in note and "deployed" in note for note in first.notes), first.notes
    second = run_demo(ctx)
    assert not second.skipped, second.skipped
    deployments = httpx.get(
        f"{runner}/v1/strategies", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ).json()
    demo = [d for d in deployments if d["name"] == DEMO_STRATEGY["name"]]
    assert len(demo) == 1
    assert demo[0]["entrypoint"] == "papertrade.samples.sma_cross:SmaCross"
    assert demo[0]["status"] in ("running", "stopped")
