"""The broker's ledger on real NATS/Postgres: idempotency, redelivery, exact invariant, isolation, errors."""

from __future__ import annotations

import os
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any
from uuid import UUID

import httpx
import psutil
import psycopg
import pytest
from sqlalchemy.engine import make_url

from papertrade.enums import ExecType, LiquiditySide, Side
from papertrade.ledger import CommissionModel, Ledger
from papertrade.messages import ExecReport, NewOrderCmd
from papertrade.timeutil import utcnow
from tests.broker.conftest import Broker, wait_for
from tests.conftest import ADMIN_TOKEN

D = Decimal


def _order(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post("/v2/orders", json={"type": "market", "time_in_force": "day", **body})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def _wait_status(c: httpx.Client, order_id: str, status: str) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (o := c.get(f"/v2/orders/{order_id}").json())["status"] == status and o,
        what=f"{order_id} {status}",
    )


def _db(broker: Broker) -> psycopg.Connection[Any]:
    url = make_url(broker.database_url).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


def _fill(order: dict[str, Any], account_id: str, qty: str, price: str, exec_id: str) -> ExecReport:
    return ExecReport(
        exec=ExecType.FILL,
        seq=1,
        order_id=UUID(order["id"]),
        account_id=UUID(account_id),
        symbol=order["symbol"],
        side=Side(order["side"]),
        t=utcnow(),
        exec_id=exec_id,
        price=D(price),
        qty=D(qty),
        liquidity=LiquiditySide.MAKER,
    )


def test_idempotent_by_client_order_id(broker: Broker) -> None:
    acct = broker.new_account()
    coid = f"idem-{uuid.uuid4().hex[:8]}"
    with broker.client(acct) as c:
        first = _order(c, symbol="AAPL", qty=1, side="buy", client_order_id=coid)
        again = _order(c, symbol="AAPL", qty=1, side="buy", client_order_id=coid)
        assert again["id"] == first["id"]

    coid2 = f"race-{uuid.uuid4().hex[:8]}"

    def submit(_: int) -> str:
        with broker.client(acct) as c2:
            return str(_order(c2, symbol="MSFT", qty=1, side="buy", client_order_id=coid2)["id"])

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(submit, range(8)))
    assert len(ids) == 1
    with _db(broker) as db:
        n = db.execute(
            "SELECT count(*) FROM orders WHERE account_id = %s AND client_order_id = %s", (acct["id"], coid2)
        ).fetchone()
    assert n is not None and n[0] == 1
    routed = [
        cmd for cmd in broker.exchange.commands if isinstance(cmd, NewOrderCmd) and str(cmd.order_id) in ids
    ]
    assert len(routed) == 1


def test_redelivered_execution_changes_nothing(broker: Broker) -> None:
    acct = broker.new_account(cash="10000")
    events = broker.exchange.watch_events(acct["id"])
    with broker.client(acct) as c:
        order = _order(
            c, symbol="AAPL", qty=10, side="buy", type="limit", limit_price="90", time_in_force="gtc"
        )
        _wait_status(c, order["id"], "new")
        report = _fill(order, acct["id"], "4", "90", f"X{uuid.uuid4().hex}")
        for i in range(3):  # three deliveries of the same execution (distinct JetStream message ids)
            broker.exchange.publish_report(report, msg_id=f"redeliver-{report.exec_id}-{i}")
        o = _wait_status(c, order["id"], "partially_filled")
        # a later, different report proves the duplicates were already consumed
        broker.exchange.publish_report(
            ExecReport(
                exec=ExecType.CANCELED,
                seq=2,
                order_id=UUID(order["id"]),
                account_id=UUID(acct["id"]),
                symbol="AAPL",
                side=Side.BUY,
                t=utcnow(),
                reason="test",
            )
        )
        o = _wait_status(c, order["id"], "canceled")
        assert o["filled_qty"] == "4" and o["filled_avg_price"] == "90"
        pos = c.get("/v2/positions/AAPL").json()
        assert pos["qty"] == "4"
        account = c.get("/v2/account").json()
        assert D(account["cash"]) == D("10000") - D("360")
        assert D(account["buying_power"]) == D(account["cash"])  # nothing held by the canceled order
        fills = c.get("/v2/account/activities/FILL").json()
        assert len(fills) == 1
        assert (
            fills[0]["activity_type"] == "FILL"
            and fills[0]["qty"] == "4"
            and fills[0]["order_id"] == order["id"]
        )
        assert fills[0]["type"] == "partial_fill" or fills[0]["leaves_qty"] != "0"
    wait_for(lambda: any(e["event"] == "canceled" for e in events), what="canceled trade update")
    kinds = [e["event"] for e in events]
    assert kinds.count("partial_fill") == 1
    fill_event = next(e for e in events if e["event"] == "partial_fill")
    assert (
        fill_event["order"]["id"] == order["id"]
        and fill_event["qty"] == "4"
        and fill_event["position_qty"] == "4"
    )


def test_trade_updates_for_a_market_order(broker: Broker) -> None:
    acct = broker.new_account()
    events = broker.exchange.watch_events(acct["id"])
    with broker.client(acct) as c:
        order = _order(c, symbol="MSFT", qty=3, side="buy")
        _wait_status(c, order["id"], "filled")
    wait_for(lambda: [e["event"] for e in events] == ["new", "fill"], what="new then fill")
    fill = events[1]
    assert fill["price"] == "200" and fill["qty"] == "3" and fill["execution_id"]
    assert fill["order"]["status"] == "filled" and fill["order"]["filled_qty"] == "3"


def test_ledger_metrics_are_served_by_the_broker(broker: Broker) -> None:
    """The ledger runs in its own process: its counters still show on the broker's /metrics."""
    acct = broker.new_account()
    with broker.client(acct) as c:
        order = _order(c, symbol="MSFT", qty=1, side="buy")
        _wait_status(c, order["id"], "filled")

    def fills_counted() -> bool:
        text = httpx.get(f"{broker.url}/metrics", timeout=10).text
        return (
            any(
                line.startswith('papertrade_broker_exec_reports_total{exec="fill",outcome="applied"}')
                and float(line.rsplit(" ", 1)[1]) >= 1
                for line in text.splitlines()
            )
            and "papertrade_broker_fill_to_commit_seconds_count" in text
        )

    wait_for(fills_counted, what="the ledger's fill counter on /metrics")


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policy")
def test_the_ledger_process_is_a_batch_worker(broker: Broker) -> None:
    """Every thread of the ledger process runs as SCHED_BATCH (`BROKER_LEDGER_SCHED_BATCH`), the
    broker's HTTP process as it was started."""
    assert broker.pid is not None
    parent = psutil.Process(broker.pid)
    (ledger,) = [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]
    threads = [t.id for t in ledger.threads()]
    assert threads and all(os.sched_getscheduler(t) == os.SCHED_BATCH for t in threads)
    assert os.sched_getscheduler(broker.pid) == os.sched_getscheduler(0)


def test_commission_on_fills_and_cash(broker: Broker) -> None:
    acct = broker.new_account(
        cash="10000", commission={"kind": "per_share", "amount": "0.01", "minimum": "1"}
    )
    broker.exchange.partial["TSLA"] = 2
    try:
        with broker.client(acct) as c:
            order = _order(c, symbol="TSLA", qty=10, side="buy")
            o = _wait_status(c, order["id"], "filled")
            assert o["commission"] == "1"  # minimum per order, across both partial fills
            account = c.get("/v2/account").json()
            assert D(account["cash"]) == D("10000") - D("500") - D("1")
            assert account["fees"] == "1"
            fees = [D(f["commission"]) for f in c.get("/v2/account/activities/FILL").json()]
            assert sorted(fees) == [D("0"), D("1")]
    finally:
        broker.exchange.partial.pop("TSLA")


def test_ledger_invariant_over_random_fills_in_postgres(broker: Broker) -> None:
    """~2,000 random fills over resting orders: Postgres matches the pure ledger to the cent."""
    commission = {"kind": "per_share", "amount": "0.005", "minimum": "0.35"}
    acct = broker.new_account(cash="100000000000", commission=commission)
    rng = random.Random(11)
    orders: list[dict[str, Any]] = []
    with broker.client(acct) as c:
        for sym in ("AAPL", "MSFT", "TSLA", "@BTCUSD"):
            for side in ("buy", "sell"):
                for _ in range(3):
                    limit = "1" if side == "buy" else "99999"
                    qty = "10000" if sym != "@BTCUSD" else "5"
                    orders.append(
                        _order(
                            c,
                            symbol=sym,
                            qty=qty,
                            side=side,
                            type="limit",
                            limit_price=limit,
                            time_in_force="gtc",
                        )
                    )
        for o in orders:
            _wait_status(c, o["id"], "new")
    ledger = Ledger(cash=D("100000000000"), commission=CommissionModel.parse(commission))
    reports: list[ExecReport] = []
    for _ in range(2000):
        o = rng.choice(orders)
        crypto = o["symbol"].startswith("@")
        qty = D(rng.randint(1, 5000)) / D(10000) if crypto else D(rng.randint(1, 40))
        price = D(rng.randint(100, 60000)) / 100
        rep = _fill(o, acct["id"], str(qty), str(price), f"R{uuid.uuid4().hex}")
        reports.append(rep)
        ledger.fill(o["symbol"], Side(o["side"]), qty, price, order_id=o["id"])
    for rep in reports:
        broker.exchange.publish_report(rep, msg_id=f"inv-{rep.exec_id}")
    ledger.check_invariant()

    def applied() -> bool:
        with _db(broker) as db:
            row = db.execute(
                "SELECT count(*) FROM executions WHERE account_id = %s", (acct["id"],)
            ).fetchone()
        return row is not None and row[0] == len(reports)

    wait_for(applied, timeout=60, what="every fill applied")
    with _db(broker) as db:
        cash, start, fees, realized = db.execute(
            "SELECT cash, starting_cash, fees, realized_pl FROM accounts WHERE id = %s", (acct["id"],)
        ).fetchone()  # type: ignore[misc]
        pos = {
            r[0]: (r[1], r[2], r[3])
            for r in db.execute(
                "SELECT symbol, qty, cost, realized_pl FROM positions WHERE account_id = %s", (acct["id"],)
            )
        }
        fill_sums = dict(
            db.execute(
                "SELECT symbol, sum(CASE WHEN side = 'buy' THEN qty ELSE -qty END) FROM executions"
                " WHERE account_id = %s GROUP BY symbol",
                (acct["id"],),
            ).fetchall()
        )
        exec_fees = db.execute(
            "SELECT sum(fee) FROM executions WHERE account_id = %s", (acct["id"],)
        ).fetchone()
    total_cost = sum((p[1] for p in pos.values()), D(0))
    assert cash + total_cost == start - fees + realized  # the invariant, exactly
    assert exec_fees is not None and exec_fees[0] == fees
    for sym, (qty, cost, rpl) in pos.items():
        assert qty == fill_sums[sym]
        want = ledger.position(sym)
        assert (qty, cost, rpl) == (want.qty, want.cost, want.realized_pl)
    assert cash == ledger.cash and fees == ledger.fees and realized == ledger.realized_pl
    with broker.client(acct) as c:
        c.delete("/v2/orders")


def test_cross_account_isolation(broker: Broker) -> None:
    a = broker.new_account()
    b = broker.new_account()
    with broker.client(a) as ca, broker.client(b) as cb:
        order = _order(
            ca, symbol="AAPL", qty=1, side="buy", type="limit", limit_price="50", time_in_force="gtc"
        )
        _wait_status(ca, order["id"], "new")
        assert cb.get(f"/v2/orders/{order['id']}").status_code == 404
        assert cb.delete(f"/v2/orders/{order['id']}").status_code == 404
        r = cb.patch(f"/v2/orders/{order['id']}", json={"qty": "2"})
        assert r.status_code == 404 and r.json()["code"] == 40410000
        assert (
            cb.get(
                "/v2/orders:by_client_order_id", params={"client_order_id": order["client_order_id"]}
            ).status_code
            == 404
        )
        assert cb.get("/v2/orders", params={"status": "all"}).json() == []
        assert cb.delete("/v2/orders").json() == []
        assert ca.get(f"/v2/orders/{order['id']}").json()["status"] == "new"
        ca.delete(f"/v2/orders/{order['id']}")


def test_bad_input_answers_alpaca_errors(broker: Broker) -> None:
    acct = broker.new_account()
    with broker.client(acct) as c:
        r = c.post("/v2/orders", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["code"] == 40010000
        cases: list[dict[str, Any]] = [
            {"symbol": "AAPL", "qty": 1, "notional": 10, "side": "buy"},
            {"symbol": "AAPL", "side": "buy"},
            {"symbol": "AAPL", "qty": 1, "side": "hold"},
            {"symbol": "AAPL", "qty": 1, "side": "buy", "type": "limit", "limit_price": "10.001"},
            {"symbol": "AAPL", "qty": 1, "side": "buy", "type": "limit"},
            {"symbol": "AAPL", "qty": "1.5", "side": "buy"},
            {"symbol": "AAPL", "qty": -1, "side": "buy"},
            {
                "symbol": "AAPL",
                "qty": 1,
                "side": "buy",
                "type": "stop",
                "stop_price": 10,
                "time_in_force": "ioc",
            },
            {"symbol": "NOPE", "qty": 1, "side": "buy"},
            {"symbol": "AAPL", "qty": "NaN", "side": "buy"},
            {"symbol": "AAPL", "qty": "1e40", "side": "buy"},
            {"symbol": "AAPL", "notional": 100, "side": "buy", "type": "limit", "limit_price": 10},
        ]
        for body in cases:
            r = c.post("/v2/orders", json={"type": "market", "time_in_force": "day", **body})
            assert r.status_code == 422, (body, r.text)
            assert r.json()["code"] == 42210000 and r.json()["message"]
        assert c.get("/v2/orders/not-a-uuid").status_code == 404
        assert c.get(f"/v2/orders/{uuid.uuid4()}").json()["code"] == 40410000
        r = c.get("/v2/orders/", follow_redirects=False)
        assert r.status_code in (404, 405) and "code" in r.json()
        assert c.get("/v2/orders", params={"limit": 501}).status_code == 422
        assert c.get("/v2/orders", params={"status": "weird"}).status_code == 422
        assert c.get("/v2/positions/NOPE").status_code == 404
        assert c.delete("/v2/positions/NOPE").status_code == 404
    assert httpx.get(f"{broker.url}/v2/account").json()["code"] == 40110000


def test_admin_accounts_and_keys(broker: Broker) -> None:
    acct = broker.new_account(cash="1234.5", self_trade_prevention="cancel_newest")
    assert acct["cash"] == "1234.5"
    with broker.admin() as adm:
        listed = adm.get("/admin/accounts").json()
        mine = next(a for a in listed if a["id"] == acct["id"])
        assert set(mine) >= {"id", "name", "account_number", "cash", "created_at"}
        assert not any("secret" in k for a in listed for k in a)
        one = adm.get(f"/admin/accounts/{acct['id']}").json()
        assert one["self_trade_prevention"] == "cancel_newest"
        r = adm.post(f"/admin/accounts/{acct['id']}/keys")
        assert r.status_code == 201
        key = r.json()
        assert adm.post(f"/admin/accounts/{uuid.uuid4()}/keys").status_code == 404
        assert adm.get(f"/admin/accounts/{uuid.uuid4()}").status_code == 404
        bad = adm.post("/admin/accounts", json={"name": "x", "cash": "-5"})
        assert bad.status_code == 422 and bad.json()["code"] == 42210000
        bad = adm.post("/admin/accounts", json={"name": "x", "commission": {"kind": "weird"}})
        assert bad.status_code == 422
    with broker.client(key) as c:
        assert c.get("/v2/account").json()["id"] == acct["id"]
    assert httpx.get(f"{broker.url}/admin/accounts").status_code == 401
    r = httpx.get(f"{broker.url}/admin/accounts", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["code"] == 40110000
    assert ADMIN_TOKEN


def test_submit_fast_path_keeps_errors_and_metrics(broker: Broker) -> None:
    """POST /v2/orders skips FastAPI's dependency solving; its answers and route metrics stay the same."""
    acct = broker.new_account()
    with broker.client(acct) as c:
        ok = c.post("/v2/orders", json={"symbol": "AAPL", "qty": "1", "side": "buy", "type": "market"})
        assert ok.status_code == 200 and ok.json()["symbol"] == "AAPL"
        bad_json = c.post("/v2/orders", content=b"{", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 400 and bad_json.json()["code"] == 40010000
        missing = c.post("/v2/orders", json={"symbol": "AAPL"})
        assert missing.status_code == 422 and "side" in missing.json()["message"]
        refused = c.post("/v2/orders", json={"symbol": "NOPE", "qty": "1", "side": "buy"})
        assert refused.status_code == 422 and "not tradable" in refused.json()["message"]
    unauthorized = httpx.post(
        f"{broker.url}/v2/orders", json={"symbol": "AAPL", "qty": "1", "side": "buy"}, timeout=10
    )
    assert unauthorized.status_code == 401 and unauthorized.json()["code"] == 40110000
    text = httpx.get(f"{broker.url}/metrics", timeout=10).text
    assert any(
        line.startswith("papertrade_http_requests_total{")
        and all(label in line for label in ('method="POST"', 'route="/v2/orders"', 'status="200"'))
        for line in text.splitlines()
    )
