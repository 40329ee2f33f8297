"""Two broker processes on one database, one NATS and one ledger durable (replicas behind a load
balancer), with the real risk and orderbook: an account's buying power is never over-committed
across them, a client_order_id sent to both makes one order, and every fill is booked once."""

from __future__ import annotations

import asyncio
import random
import string
import uuid
from decimal import Decimal
from typing import Any

import httpx
import psycopg

from papertrade.stack.infra import Endpoints
from papertrade_broker.hotpath import libpq_url
from tests.broker.conftest import key_headers, real_exchange, wait_for
from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PRICE = "100"
#: the buys that fit the buyer's cash
BIDS = 30


def test_two_brokers_share_accounts_orders_and_the_ledger(
    start_services: Any, infra: Endpoints, fresh_database_url: str
) -> None:
    sym = "RP" + "".join(random.choices(string.ascii_uppercase, k=4))
    _, tag = real_exchange(start_services, infra.redis_url, fresh_database_url, sym, PRICE)
    durable = {"BROKER_LEDGER_DURABLE": f"broker-{tag}"}
    urls = [start_services("broker", database_url=fresh_database_url, **durable)[1] for _ in range(2)]
    with httpx.Client(base_url=urls[0], headers=ADMIN, timeout=10) as adm:
        buyer = adm.post("/admin/accounts", json={"name": "buyer", "cash": str(BIDS * Decimal(PRICE))}).json()
        seller = adm.post("/admin/accounts", json={"name": "seller", "cash": "100000"}).json()
    wait_for(lambda: _accepts(urls[1], seller, sym), timeout=30, what="the book opened the symbol")

    # 90 buys of 100 each from a 3,000 account, alternating between the brokers, all at once:
    # exactly 30 fit, whichever broker took them
    answers = asyncio.run(_submit_all(urls, buyer, [_limit(sym, "buy", PRICE) for _ in range(90)]))
    booked = [a for status, a in answers if status == 200]
    refused = [a for status, a in answers if status != 200]
    assert len(booked) == BIDS, answers
    assert {status for status, _ in answers} == {200, 403}
    assert all("insufficient buying power" in a["message"] for a in refused), refused
    for url in urls:
        assert Decimal(_get(url, buyer, "/v2/account")["buying_power"]) == 0

    # one client_order_id sent to both brokers at once: one order, answered by both
    dup = _limit(sym, "sell", "1000") | {"client_order_id": f"dup-{tag}"}
    both = asyncio.run(_submit_all(urls, seller, [dup, dup]))
    assert [s for s, _ in both] == [200, 200], both
    assert both[0][1]["id"] == both[1][1]["id"]
    with httpx.Client(base_url=urls[1], headers=key_headers(seller)) as c:
        assert c.delete(f"/v2/orders/{both[0][1]['id']}").status_code == 204

    # the seller crosses every bid through both brokers, 3 bids per sell, and the two ledgers share
    # the reports: orders filled by several fills, booked by either ledger
    sells = [_limit(sym, "sell", PRICE) | {"qty": "3"} for _ in range(BIDS // 3)]
    sold = asyncio.run(_submit_all(urls, seller, sells))
    assert [s for s, _ in sold] == [200] * len(sells), sold
    orders = [(buyer, a["id"]) for a in booked] + [(seller, a["id"]) for _, a in sold]
    wait_for(
        lambda: all(_get(urls[0], acct, f"/v2/orders/{oid}")["status"] == "filled" for acct, oid in orders),
        timeout=60,
        what="every order filled",
    )
    for url in urls:
        acct = _get(url, buyer, "/v2/account")
        assert Decimal(acct["cash"]) == 0 and Decimal(acct["buying_power"]) == 0
        assert [(p["symbol"], Decimal(p["qty"])) for p in _get(url, buyer, "/v2/positions")] == [(sym, BIDS)]
        assert Decimal(_get(url, seller, "/v2/account")["cash"]) == 100000 + BIDS * Decimal(PRICE)
        assert [(p["symbol"], Decimal(p["qty"])) for p in _get(url, seller, "/v2/positions")] == [
            (sym, -BIDS)
        ]
        assert len(_get(url, buyer, "/v2/account/activities/FILL")) == BIDS
    with psycopg.connect(libpq_url(fresh_database_url)) as conn:
        rows = conn.execute(
            "SELECT o.qty, o.filled_qty, coalesce(sum(e.qty), 0), count(DISTINCT e.exec_id) FROM orders o "
            "LEFT JOIN executions e ON e.order_id = o.id WHERE o.id = ANY(%s) GROUP BY o.id",
            ([uuid.UUID(oid) for _, oid in orders],),
        ).fetchall()
    assert len(rows) == len(orders)
    assert all(qty == filled == total for qty, filled, total, _ in rows), rows
    assert sum(n for *_, n in rows) == 2 * BIDS
    # both ledger processes booked reports (the durable consumer is shared)
    assert all(_reports_booked(url) > 0 for url in urls)


async def _submit_all(urls: list[str], account: dict[str, Any], bodies: list[dict[str, Any]]) -> list[Any]:
    """Each body to broker i % 2, all in flight together: (status, JSON answer) in order."""
    async with httpx.AsyncClient(headers=key_headers(account), timeout=20) as c:

        async def one(i: int, body: dict[str, Any]) -> tuple[int, Any]:
            resp = await c.post(f"{urls[i % 2]}/v2/orders", json=body)
            return resp.status_code, resp.json()

        return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))


def _accepts(url: str, account: dict[str, Any], sym: str) -> bool:
    """A far-away order the book takes (then canceled): the symbol is open."""
    with httpx.Client(base_url=url, headers=key_headers(account), timeout=10) as c:
        resp = c.post("/v2/orders", json=_limit(sym, "sell", "1000"))
        if resp.status_code != 200:
            return False
        oid = resp.json()["id"]
        status = wait_for(lambda: (s := _status(c, oid)) != "pending_new" and s, 20)
        if status != "new":
            return False
        assert c.delete(f"/v2/orders/{oid}").status_code == 204
        wait_for(lambda: _status(c, oid) == "canceled", 20)
        return True


def _status(c: httpx.Client, oid: str) -> str:
    status: str = c.get(f"/v2/orders/{oid}").json()["status"]
    return status


def _reports_booked(url: str) -> float:
    """Execution reports this broker's ledger process booked (its /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("papertrade_broker_exec_reports_total{")
    )


def _limit(sym: str, side: str, price: str) -> dict[str, Any]:
    return {
        "symbol": sym,
        "qty": "1",
        "side": side,
        "type": "limit",
        "limit_price": price,
        "time_in_force": "gtc",
    }


def _get(url: str, account: dict[str, Any], path: str) -> Any:
    with httpx.Client(base_url=url, headers=key_headers(account), timeout=10) as c:
        resp = c.get(path)
        assert resp.status_code == 200, resp.text
        return resp.json()
