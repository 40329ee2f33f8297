"""The demo `make up` sets up once every service is ready (skip it with `--no-demo`).

The hook is `run_demo(DemoContext) -> DemoResult`: it gets the services' URLs and the admin token and
returns extra `KEY=value` lines for `.papertrade/stack.env` plus notes for the console. It never raises:
whatever it cannot do is reported as skipped, with the reason, and the stack keeps running.

What it does:
- a demo account through the broker's `POST /admin/accounts`, created once and reused across runs (its
  key pair is kept in `.papertrade/demo_account.json`, mode 600, because the broker shows a secret
  only once);
- the SMA-crossover sample deployed on that account over the strategy-runner's REST, on a symbol that
  trades at any hour (`@BTCUSD`, 1-minute bars), once (a deployment of the same name is reused).
The synthetic feed (streamer defaults: AAPL, MSFT, SPY, @BTCUSD) and the synthetic liquidity
(orderbook default: on) need no set-up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEMO_ACCOUNT_NAME = "demo"
DEMO_CASH = "100000"
DEMO_ACCOUNT_FILE = "demo_account.json"
DEMO_STRATEGY = {
    "name": "demo-sma-crossover",
    "entrypoint": "papertrade.samples.sma_cross:SmaCross",
    "params": {"fast": 5, "slow": 20, "qty": 1},
    "symbols": ["@BTCUSD"],
    "interval": "1m",
}


@dataclass(frozen=True)
class DemoContext:
    #: service name -> base URL (broker, streamer, orderbook, risk, strategy-runner)
    urls: Mapping[str, str]
    admin_token: str
    data_dir: Path


@dataclass
class DemoResult:
    #: extra `KEY=value` lines for stack.env (e.g. APCA_API_KEY_ID / APCA_API_SECRET_KEY)
    env: dict[str, str] = field(default_factory=dict)
    #: what was done, one line each, for the console
    notes: list[str] = field(default_factory=list)
    #: why (part of) the demo was skipped, one line each
    skipped: list[str] = field(default_factory=list)


DemoHook = Callable[[DemoContext], DemoResult]


def run_demo(ctx: DemoContext) -> DemoResult:
    """Set up the demo; never raises (a failure becomes a `skipped` line)."""
    result = DemoResult()
    try:
        _demo_account(ctx, result)
    except Exception as exc:
        result.skipped.append(f"demo account: {type(exc).__name__}: {exc}")
    account_id = _load_saved(ctx.data_dir) or {}
    if "APCA_API_KEY_ID" in result.env and account_id.get("id"):
        try:
            _demo_strategy(ctx, result, account_id["id"])
        except Exception as exc:
            result.skipped.append(f"demo strategy: {type(exc).__name__}: {exc}")
    return result


def _demo_account(ctx: DemoContext, result: DemoResult) -> None:
    if "broker" not in ctx.urls:
        result.skipped.append("demo account: this stack runs no broker")
        return
    broker = ctx.urls["broker"].rstrip("/")
    headers = {"Authorization": f"Bearer {ctx.admin_token}"}
    with httpx.Client(base_url=broker, headers=headers, timeout=10.0) as client:
        listing = client.get("/admin/accounts")
        if listing.status_code in (404, 405):
            result.skipped.append(
                "demo account: the broker does not serve GET /admin/accounts yet "
                f"({listing.status_code}); no demo account was created"
            )
            return
        if listing.status_code != 200:
            result.skipped.append(
                f"demo account: GET /admin/accounts answered {listing.status_code}: {listing.text[:200]}"
            )
            return
        known = {str(a.get("id")) for a in _accounts(listing.json())}
        saved = _load_saved(ctx.data_dir)
        if saved is not None and saved.get("id") in known:
            result.notes.append(f"demo account {saved['id']} (reused, cash at creation {saved.get('cash')})")
        else:
            created = client.post("/admin/accounts", json={"name": DEMO_ACCOUNT_NAME, "cash": DEMO_CASH})
            if created.status_code not in (200, 201):
                result.skipped.append(
                    f"demo account: POST /admin/accounts answered {created.status_code}: {created.text[:200]}"
                )
                return
            body = created.json()
            saved = {k: str(body[k]) for k in ("id", "api_key_id", "api_secret_key") if k in body}
            saved["cash"] = str(body.get("cash", DEMO_CASH))
            if not {"id", "api_key_id", "api_secret_key"} <= saved.keys():
                result.skipped.append(f"demo account: unexpected answer from POST /admin/accounts: {body}")
                return
            _save(ctx.data_dir, saved)
            result.notes.append(f"demo account {saved['id']} created with cash {saved['cash']}")
    result.env["APCA_API_KEY_ID"] = saved["api_key_id"]
    result.env["APCA_API_SECRET_KEY"] = saved["api_secret_key"]
    result.env["APCA_API_BASE_URL"] = broker


def _demo_strategy(ctx: DemoContext, result: DemoResult, account_id: str) -> None:
    if "strategy-runner" not in ctx.urls:
        result.skipped.append("demo strategy: this stack runs no strategy-runner")
        return
    runner = ctx.urls["strategy-runner"].rstrip("/")
    headers = {"Authorization": f"Bearer {ctx.admin_token}"}
    with httpx.Client(base_url=runner, headers=headers, timeout=15.0) as client:
        listing = client.get("/v1/strategies")
        if listing.status_code != 200:
            result.skipped.append(f"demo strategy: GET /v1/strategies answered {listing.status_code}")
            return
        for dep in listing.json():
            if (
                dep.get("name") == DEMO_STRATEGY["name"]
                and str(dep.get("account_id", account_id)) == account_id
            ):
                result.notes.append(
                    f"demo strategy {dep.get('id')} ({DEMO_STRATEGY['name']}, {dep.get('status')})"
                )
                return
        created = client.post("/v1/strategies", json={**DEMO_STRATEGY, "account_id": account_id})
        if created.status_code not in (200, 201):
            result.skipped.append(
                f"demo strategy: POST /v1/strategies answered {created.status_code}: {created.text[:200]}"
            )
            return
        body = created.json()
        result.notes.append(
            f"demo strategy {body.get('id')} deployed: {DEMO_STRATEGY['entrypoint']} on "
            f"{', '.join(DEMO_STRATEGY['symbols'])} {DEMO_STRATEGY['interval']} (status {body.get('status')})"
        )


def _accounts(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, list):
        return [a for a in body if isinstance(a, dict)]
    if isinstance(body, dict) and isinstance(body.get("accounts"), list):
        return [a for a in body["accounts"] if isinstance(a, dict)]
    return []


def _load_saved(data_dir: Path) -> dict[str, str] | None:
    try:
        data = json.loads((data_dir / DEMO_ACCOUNT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else None


def _save(data_dir: Path, saved: Mapping[str, str]) -> None:
    path = data_dir / DEMO_ACCOUNT_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(saved), f, indent=2)
