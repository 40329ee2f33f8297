"""The risk service over NATS and REST, against real NATS, Postgres and Redis."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from papertrade import codec, keys
from papertrade.bus import subjects
from papertrade.enums import ExecType, Side
from papertrade.messages import CancelCmd, ExecReport, RiskCheckRequest, TradePrint
from tests.risk.conftest import ADMIN, ask, fresh_symbol, put_limits, request

D = Decimal


async def publish_exec(nc: NATS, report: ExecReport) -> None:
    js = nc.jetstream()
    await js.publish(subjects.ex_exec(report.symbol), codec.encode(report))


def report(
    kind: ExecType,
    req: RiskCheckRequest,
    seq: int,
    qty: str | None = None,
    price: str | None = None,
    leaves: str | None = None,
) -> ExecReport:
    return ExecReport(
        exec=kind,
        seq=seq,
        order_id=req.order_id,
        account_id=req.account_id,
        symbol=req.symbol,
        side=req.side,
        t=datetime.now(UTC),
        exec_id=uuid.uuid4().hex if kind is ExecType.FILL else None,
        price=None if price is None else D(price),
        qty=None if qty is None else D(qty),
        leaves_qty=None if leaves is None else D(leaves),
    )


async def exposure(url: str, account: uuid.UUID) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{url}/v1/exposure/{account}")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def get(url: str, **params: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url, params=params)


async def eventually(check: Any, timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# --- limits over REST ----------------------------------------------------------------------------------


async def test_limits_roundtrip_every_field(risk_url: str, account: uuid.UUID) -> None:
    r = await get(f"{risk_url}/v1/limits/{account}")
    assert r.status_code == 200
    body = r.json()
    assert body["max_order_qty"] is None and body["allowed_symbols"] is None
    assert body["trading_hours"] == "any" and body["clip_to_limits"] is False
    put_limits(risk_url, account, max_order_qty=100, blocked_symbols=["tsla"], max_daily_loss="250.5")
    body = (await get(f"{risk_url}/v1/limits/{account}")).json()
    assert body["max_order_qty"] == "100" and body["blocked_symbols"] == ["TSLA"]
    assert body["max_daily_loss"] == "250.5" and body["max_position_qty"] is None
    # PUT replaces the whole object
    put_limits(risk_url, account, max_position_qty=5)
    body = (await get(f"{risk_url}/v1/limits/{account}")).json()
    assert body["max_order_qty"] is None and body["max_position_qty"] == "5"


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"max_order_qty": -5}, "max_order_qty"),
        ({"max_order_notional": "ten"}, "max_order_notional"),
        ({"price_collar_pct": 0}, "price_collar_pct"),
        ({"allowed_symbols": [1, "not ok!"]}, "allowed_symbols"),
        ({"trading_hours": "night"}, "trading_hours"),
        ({"max_order_qtty": 1}, "max_order_qtty"),
        ({"clip_to_limits": "perhaps"}, "clip_to_limits"),
    ],
)
def test_bad_limit_payloads_are_422_naming_the_field(
    risk_url: str, payload: dict[str, Any], needle: str
) -> None:
    r = httpx.put(f"{risk_url}/v1/limits/{uuid.uuid4()}", json=payload, headers=ADMIN)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == 42210000 and needle in body["message"]


def test_limits_auth_and_malformed(risk_url: str) -> None:
    acct = uuid.uuid4()
    assert httpx.put(f"{risk_url}/v1/limits/{acct}", json={}).status_code == 401
    r = httpx.put(
        f"{risk_url}/v1/limits/{acct}",
        content=b"{not json",
        headers={**ADMIN, "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["code"] == 40010000
    assert httpx.put(f"{risk_url}/v1/limits/not-a-uuid", json={}, headers=ADMIN).status_code == 422


# --- checks over NATS ------------------------------------------------------------------------------------


async def test_unlimited_account_is_approved(risk_url: str, nc: NATS, account: uuid.UUID) -> None:
    d = await ask(nc, request(account, fresh_symbol(), "1000000"))
    assert d.decision == "approve" and d.reason is None


async def test_order_qty_at_under_over(risk_url: str, nc: NATS, account: uuid.UUID) -> None:
    put_limits(risk_url, account, max_order_qty=500)
    sym = fresh_symbol()
    assert (await ask(nc, request(account, sym, "499"))).decision == "approve"
    assert (await ask(nc, request(account, sym, "500"))).decision == "approve"
    d = await ask(nc, request(account, sym, "501"))
    assert (
        d.decision == "reject" and d.reason == "max_order_qty 500 exceeded: order qty 501" and not d.throttled
    )


async def test_position_limit_counts_open_orders_and_releases_on_exec(
    risk_url: str, nc: NATS, account: uuid.UUID
) -> None:
    put_limits(risk_url, account, max_position_qty=500)
    sym = fresh_symbol()
    first = request(account, sym, "300", limit="10")
    assert (await ask(nc, first)).decision == "approve"
    assert (await ask(nc, request(account, sym, "200", limit="10"))).decision == "approve"  # at the limit
    d = await ask(nc, request(account, sym, "1", limit="10"))
    assert d.decision == "reject" and d.reason == "max_position_qty 500 exceeded: would be 501"
    # the book fills 120 of the first order and cancels the rest: 120 held + 200 open = 320
    await publish_exec(nc, report(ExecType.FILL, first, 1, qty="120", price="10", leaves="180"))
    await publish_exec(nc, report(ExecType.CANCELED, first, 2))

    async def released() -> bool:
        e = await exposure(risk_url, account)
        return e["positions"].get(sym, {}).get("qty") == "120" and str(first.order_id) not in e["open_orders"]

    await eventually(released)
    assert (await ask(nc, request(account, sym, "180", limit="10"))).decision == "approve"
    d = await ask(nc, request(account, sym, "1", limit="10"))
    assert d.reason == "max_position_qty 500 exceeded: would be 501"


async def test_exec_reports_are_idempotent(risk_url: str, nc: NATS, account: uuid.UUID) -> None:
    sym = fresh_symbol()
    req = request(account, sym, "10", limit="5")
    assert (await ask(nc, req)).decision == "approve"
    fill = report(ExecType.FILL, req, 7, qty="4", price="5", leaves="6")
    for _ in range(3):  # redelivered: applied once
        await publish_exec(nc, fill)

    async def applied() -> dict[str, Any] | None:
        e = await exposure(risk_url, account)
        return e if sym in e["positions"] else None

    e = await eventually(applied)
    await asyncio.sleep(0.3)
    e = await exposure(risk_url, account)
    assert e["positions"][sym]["qty"] == "4"
    assert e["open_orders"][str(req.order_id)]["qty"] == "6"


async def test_clip_over_nats(risk_url: str, nc: NATS, account: uuid.UUID) -> None:
    put_limits(risk_url, account, max_order_qty=100, clip_to_limits=True)
    d = await ask(nc, request(account, fresh_symbol(), "250"))
    assert d.decision == "clip" and d.qty == D("100") and d.rule == "max_order_qty"


async def test_collar_uses_last_trade_else_bar_close(
    risk_url: str, nc: NATS, redis: Redis, account: uuid.UUID
) -> None:
    put_limits(risk_url, account, price_collar_pct=10)
    with_bar, with_last = fresh_symbol(), fresh_symbol()
    bar = {"symbol": with_bar, "interval": "1m", "t": "2026-11-20T15:00:00Z", "o": "50", "h": "50", "l": "50",
           "c": "50", "v": "1"}  # fmt: skip
    await redis.set(keys.latest_bar("1m", with_bar), orjson.dumps(bar))
    await redis.set(keys.last_trade(with_last), orjson.dumps({"price": "200", "t": "2026-11-20T15:00:00Z"}))
    await redis.set(keys.latest_bar("1m", with_last), orjson.dumps({**bar, "symbol": with_last}))
    assert (await ask(nc, request(account, with_bar, "1", limit="55"))).decision == "approve"
    d = await ask(nc, request(account, with_bar, "1", limit="55.01"))
    assert d.rule == "price_collar_pct" and "reference price 50" in (d.reason or "")
    assert (await ask(nc, request(account, with_last, "1", limit="180"))).decision == "approve"
    d = await ask(nc, request(account, with_last, "1", limit="179.99"))
    assert d.rule == "price_collar_pct" and "reference price 200" in (d.reason or "")
    # a trade print moves the mark at once
    print_ = TradePrint(symbol=with_last, price=D("100"), qty=D("1"), t=datetime.now(UTC),
                        aggressor_side=Side.BUY, execution_id="x")  # fmt: skip
    await nc.publish(subjects.ex_trade(with_last), codec.encode(print_))
    await nc.flush()

    async def moved() -> bool:
        return (await ask(nc, request(account, with_last, "1", limit="109"))).decision == "approve"

    await eventually(moved)


async def test_rate_limit_is_throttled(risk_url: str, nc: NATS, account: uuid.UUID) -> None:
    put_limits(risk_url, account, max_orders_per_second=5)
    sym = fresh_symbol()
    decisions = await asyncio.gather(*(ask(nc, request(account, sym, "1")) for _ in range(6)))
    approved = [d for d in decisions if d.decision == "approve"]
    throttled = [d for d in decisions if d.decision == "reject"]
    assert len(approved) == 5 and len(throttled) == 1
    assert throttled[0].throttled and throttled[0].rule == "max_orders_per_second"
    assert throttled[0].reason == "max_orders_per_second 5 exceeded"
    await asyncio.sleep(0.45)  # ~2 tokens back
    again = await asyncio.gather(*(ask(nc, request(account, sym, "1")) for _ in range(3)))
    assert sum(d.decision == "approve" for d in again) == 2


async def test_kill_switch_account_and_global(risk_url: str, nc: NATS, account: uuid.UUID) -> None:
    other = uuid.uuid4()
    sym = fresh_symbol()
    async with httpx.AsyncClient(base_url=risk_url, headers=ADMIN, timeout=10) as client:
        r = await client.post(
            "/v1/kill-switch", json={"account_id": str(account), "engaged": True, "reason": "oops"}
        )
        assert r.status_code == 200, r.text
        d = await ask(nc, request(account, sym))
        assert d.decision == "reject" and d.rule == "kill_switch"
        assert d.reason == "kill switch engaged for this account: oops"
        assert (await ask(nc, request(other, sym))).decision == "approve"
        body = (await client.get("/v1/kill-switch")).json()
        assert body["accounts"][str(account)] == {"engaged": True, "reason": "oops"}

        r = await client.post("/v1/kill-switch", json={"account_id": None, "engaged": True, "reason": "halt"})
        assert r.status_code == 200
        try:
            d = await ask(nc, request(other, sym))
            assert d.rule == "kill_switch" and d.reason == "kill switch engaged for all accounts: halt"
            assert (await client.get("/v1/kill-switch")).json()["global"] == {
                "engaged": True,
                "reason": "halt",
            }
        finally:
            r = await client.post("/v1/kill-switch", json={"account_id": None, "engaged": False})
            assert r.status_code == 200
        assert (await ask(nc, request(other, sym))).decision == "approve"
        await client.post("/v1/kill-switch", json={"account_id": str(account), "engaged": False})
        assert (await ask(nc, request(account, sym))).decision == "approve"
        assert (
            await client.post("/v1/kill-switch", json={"engaged": True}, headers={"Authorization": ""})
        ).status_code == 401


async def test_kill_switch_cancels_open_orders(risk_url: str, nc: NATS, account: uuid.UUID) -> None:
    sym = fresh_symbol()
    reqs = [request(account, sym, "5", limit="10") for _ in range(3)]
    for req in reqs:
        assert (await ask(nc, req)).decision == "approve"
    seen: list[CancelCmd] = []

    async def on_cmd(msg: Any) -> None:
        seen.append(codec.decode(msg.data, CancelCmd))

    sub = await nc.subscribe(subjects.ex_cmd(sym), cb=on_cmd)
    await nc.flush()
    async with httpx.AsyncClient(base_url=risk_url, headers=ADMIN, timeout=10) as client:
        r = await client.post(
            "/v1/kill-switch",
            json={"account_id": str(account), "engaged": True, "reason": "flatten", "cancel_orders": True},
        )
        assert r.status_code == 200 and r.json()["canceled_orders"] == 3

        async def got_all() -> bool:
            return len(seen) == 3

        await eventually(got_all)
        assert {c.order_id for c in seen} == {r.order_id for r in reqs}
        assert all(c.account_id == account and c.symbol == sym for c in seen)
        await client.post("/v1/kill-switch", json={"account_id": str(account), "engaged": False})
    await sub.unsubscribe()


async def test_decisions_are_audited(risk_url: str, nc: NATS, account: uuid.UUID) -> None:
    put_limits(risk_url, account, max_order_qty=10)
    sym = fresh_symbol()
    ok = request(account, sym, "10")
    bad = request(account, sym, "11")
    await ask(nc, ok)
    await ask(nc, bad)

    async def listed() -> list[Any] | None:
        r = await get(f"{risk_url}/v1/decisions", account_id=str(account), limit=5)
        assert r.status_code == 200
        rows: list[Any] = r.json()
        return rows if len(rows) == 2 else None

    rows = await eventually(listed)
    assert rows[0]["order_id"] == str(bad.order_id) and rows[0]["decision"] == "reject"
    assert rows[0]["reason"] == "max_order_qty 10 exceeded: order qty 11"
    assert rows[1]["order_id"] == str(ok.order_id) and rows[1]["decision"] == "approve"
    everyone = (await get(f"{risk_url}/v1/decisions", limit=1000)).json()
    assert any(row["order_id"] == str(bad.order_id) for row in everyone)
    assert (await get(f"{risk_url}/v1/decisions", limit=0)).status_code == 422


async def test_unreadable_request_is_rejected(risk_url: str, nc: NATS) -> None:
    msg = await nc.request(subjects.RISK_CHECK, b'{"order_id": 5}', timeout=5)
    body = orjson.loads(msg.data)
    assert body["decision"] == "reject" and "unreadable" in body["reason"]


async def test_replace_releases_the_old_reservation(risk_url: str, nc: NATS, account: uuid.UUID) -> None:
    put_limits(risk_url, account, max_position_qty=100)
    sym = fresh_symbol()
    old = request(account, sym, "100", limit="10")
    assert (await ask(nc, old)).decision == "approve"
    assert (await ask(nc, request(account, sym, "1", limit="10"))).decision == "reject"
    assert (
        await ask(nc, request(account, sym, "100", limit="11", replaces=old.order_id))
    ).decision == "approve"
    e = await exposure(risk_url, account)
    assert str(old.order_id) not in e["open_orders"] and len(e["open_orders"]) == 1


async def test_release_frees_an_order_that_never_reached_the_book(
    risk_url: str, nc: NATS, account: uuid.UUID
) -> None:
    put_limits(risk_url, account, max_position_qty=100)
    sym = fresh_symbol()
    dropped = request(account, sym, "100", limit="10")
    assert (await ask(nc, dropped)).decision == "approve"
    assert (await ask(nc, request(account, sym, "1", limit="10"))).decision == "reject"
    cmd = CancelCmd(
        order_id=dropped.order_id, account_id=account, symbol=sym, t=datetime.now(UTC), reason="refused"
    )
    await nc.publish(subjects.RISK_RELEASE, codec.encode(cmd))
    await nc.flush()

    async def released() -> bool:
        return str(dropped.order_id) not in (await exposure(risk_url, account))["open_orders"]

    await eventually(released)
    assert (await ask(nc, request(account, sym, "100", limit="10"))).decision == "approve"
