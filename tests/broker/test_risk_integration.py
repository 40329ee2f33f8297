"""The broker's side of risk: releases of approved orders it refused, clipped notionals, simulation time.

Risk here is the fake of `tests.broker.fakes` (it records every check and every `risk.release`);
`test_real_stack.py` repeats the release and the simulation time with the real risk process.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
import redis

from papertrade import keys
from tests.broker.conftest import Broker, wait_for

#: a buy far below the market: the fake book rests it
RESTING_BUY = {
    "symbol": "TSLA",
    "qty": "2",
    "side": "buy",
    "type": "limit",
    "time_in_force": "gtc",
    "limit_price": "1",
}


def test_buying_power_refusal_after_approval_releases_risk(broker: Broker) -> None:
    acct = broker.new_account(cash="1000")
    with broker.client(acct) as c:
        r = c.post(
            "/v2/orders",
            json={
                "symbol": "AAPL",
                "qty": "100",
                "side": "buy",
                "type": "limit",
                "time_in_force": "gtc",
                "limit_price": "100",
            },
        )
    assert r.status_code == 403 and "insufficient buying power" in r.json()["message"]
    checked = [q for q in broker.exchange.risk_requests if str(q.account_id) == acct["id"]]
    assert len(checked) == 1  # risk approved it, then the broker refused it
    released = wait_for(lambda: _released(broker, acct["id"]), what="risk.release")
    assert [x.order_id for x in released] == [checked[0].order_id]
    assert released[0].symbol == "AAPL" and "insufficient buying power" in (released[0].reason or "")


def test_approved_order_that_reaches_the_book_is_not_released(broker: Broker) -> None:
    acct = broker.new_account(cash="100000")
    with broker.client(acct) as c:
        r = c.post(
            "/v2/orders",
            json={"symbol": "AAPL", "qty": "1", "side": "buy", "type": "market", "time_in_force": "day"},
        )
        assert r.status_code == 200, r.text
        # a risk reject reserves nothing: nothing to hand back either
        assert (
            c.post(
                "/v2/orders",
                json={"symbol": "RISKY", "qty": "1", "side": "buy", "type": "market", "time_in_force": "day"},
            ).status_code
            == 403
        )
        # a later refusal proves the release subscription is live, so an absent release is meaningful
        c.post(
            "/v2/orders",
            json={"symbol": "AAPL", "qty": "100000", "side": "buy", "type": "market", "time_in_force": "day"},
        )
    released = wait_for(lambda: _released(broker, acct["id"]), what="the refusal's release")
    assert len(released) == 1 and str(released[0].order_id) != r.json()["id"]


def test_duplicate_client_order_id_race_releases_the_losers(broker: Broker) -> None:
    acct = broker.new_account(cash="100000")
    body = {
        "symbol": "MSFT",
        "qty": "1",
        "side": "buy",
        "type": "limit",
        "time_in_force": "gtc",
        "limit_price": "1",
        "client_order_id": "same-coid-race",
    }

    def submit(_: int) -> Any:
        with broker.client(acct) as c:
            return c.post("/v2/orders", json=body)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(submit, range(8)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1  # one order, never a second
    winner = UUID(ids.pop())
    approved = {q.order_id for q in broker.exchange.risk_requests if str(q.account_id) == acct["id"]}
    assert winner in approved
    losers = approved - {winner}
    wait_for(lambda: {x.order_id for x in _released(broker, acct["id"])} == losers, what="losers released")
    assert all(x.reason == "duplicate client_order_id" for x in _released(broker, acct["id"]))


def test_clipped_notional_order_uses_the_new_notional(broker: Broker) -> None:
    acct = broker.new_account(cash="100000")
    with broker.client(acct) as c:
        r = c.post(
            "/v2/orders",
            json={
                "symbol": "CLIPN",
                "notional": "100",
                "side": "buy",
                "type": "market",
                "time_in_force": "day",
            },
        )
        assert r.status_code == 200, r.text
        order = r.json()
        assert order["notional"] == "30" and order["qty"] is None
        filled = wait_for(
            lambda: (o := c.get(f"/v2/orders/{order['id']}").json())["status"] == "filled" and o,
            what="clipped notional filled",
        )
    assert Decimal(filled["filled_qty"]) == 3  # 30 at 10
    assert not _released(broker, acct["id"])


def test_risk_request_time_is_the_simulation_clock(broker: Broker) -> None:
    acct = broker.new_account(cash="100000")
    sim = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)
    r = redis.Redis.from_url(broker.redis_url)
    body = {
        "symbol": "MSFT",
        "qty": "1",
        "side": "buy",
        "type": "limit",
        "time_in_force": "gtc",
        "limit_price": "1",
    }
    try:
        r.set(
            keys.CLOCK,
            orjson.dumps(
                {
                    "timestamp": "2026-11-23T15:00:00Z",
                    "is_open": True,
                    "next_open": "2026-11-24T14:30:00Z",
                    "next_close": "2026-11-23T21:00:00Z",
                }
            ),
        )
        with broker.client(acct) as c:
            # the broker caches the clock for a moment: submit until a check carries the new time
            wait_for(
                lambda: c.post("/v2/orders", json=body).status_code == 200 and _last_t(broker, acct) == sim,
                what="risk.check at the simulation time",
            )
            r.delete(keys.CLOCK)
            # no streamer clock: the wall clock
            wait_for(
                lambda: (
                    c.post("/v2/orders", json=body).status_code == 200
                    and abs(_last_t(broker, acct) - datetime.now(UTC)) < timedelta(minutes=1)
                ),
                what="risk.check at the wall clock",
            )
    finally:
        r.delete(keys.CLOCK)
        r.close()


def test_order_whose_command_jetstream_refuses_is_rejected_and_released(broker: Broker) -> None:
    acct = broker.new_account(cash="100000")
    # TSLA's command finds no stream (the fake book, which listens on core NATS, plays dead)
    broker.exchange.narrow_command_stream(["ex.cmd.AAPL"])
    broker.exchange.book_enabled = False
    try:
        with broker.client(acct) as c:
            r = c.post("/v2/orders", json=RESTING_BUY)
            assert r.status_code in (200, 503), r.text
            if r.status_code == 200:  # the ack is awaited after the answer: the order ends rejected
                oid = r.json()["id"]
                done = wait_for(
                    lambda: (o := c.get(f"/v2/orders/{oid}").json())["status"] == "rejected" and o,
                    timeout=30,
                    what="unrouted order rejected",
                )
                assert "orderbook command stream unavailable" in done["reason"]
                assert done["filled_qty"] == "0"
            # nothing stays held: the whole cash is buying power again
            acc = c.get("/v2/account").json()
            assert Decimal(acc["buying_power"]) == Decimal("100000")
    finally:
        broker.exchange.book_enabled = True
        broker.exchange.narrow_command_stream(None)
    released = wait_for(lambda: _released(broker, acct["id"]), what="risk.release of the unrouted order")
    assert "orderbook command stream unavailable" in (released[0].reason or "")


def test_a_cancel_the_stream_refused_can_be_sent_again(broker: Broker) -> None:
    acct = broker.new_account(cash="100000")
    with broker.client(acct) as c:
        r = c.post("/v2/orders", json=RESTING_BUY)
        assert r.status_code == 200, r.text
        oid = r.json()["id"]
        wait_for(lambda: c.get(f"/v2/orders/{oid}").json()["status"] == "new", what="the order rests")
        # the cancel's command finds no stream (and the fake book, on core NATS, plays dead)
        broker.exchange.narrow_command_stream(["ex.cmd.AAPL"])
        broker.exchange.book_enabled = False
        try:
            r = c.delete(f"/v2/orders/{oid}")
            assert r.status_code == 503, r.text
            assert "orderbook command stream unavailable" in r.json()["message"]
            assert c.get(f"/v2/orders/{oid}").json()["status"] == "pending_cancel"
        finally:
            broker.exchange.book_enabled = True
            broker.exchange.narrow_command_stream(None)
        # asked again, the broker sends the cancel again (it is not a no-op for a pending cancel)
        r = c.delete(f"/v2/orders/{oid}")
        assert r.status_code == 204, r.text
        wait_for(lambda: c.get(f"/v2/orders/{oid}").json()["status"] == "canceled", what="the order canceled")
        acc = c.get("/v2/account").json()
        assert Decimal(acc["buying_power"]) == Decimal("100000")


def _released(broker: Broker, account_id: str) -> list[Any]:
    return [x for x in broker.exchange.releases if str(x.account_id) == account_id]


def test_book_commands_carry_the_simulation_time(broker: Broker) -> None:
    """The book runs on the streamer's clock (DAY expiry, execution times): an order's command carries
    the simulation time, moved on at the clock's speed since it was written; its row keeps the wall clock."""
    acct = broker.new_account(cash="100000")
    r = redis.Redis.from_url(broker.redis_url)
    body = {"symbol": "MSFT", "qty": "1", "side": "buy", "type": "limit", "time_in_force": "day"}
    body["limit_price"] = "1"
    sim = datetime(2024, 3, 4, 15, 0, tzinfo=UTC)

    def clock(speed: float) -> bytes:
        return orjson.dumps(
            {
                "timestamp": "2024-03-04T15:00:00Z",
                "is_open": True,
                "next_open": "2024-03-05T14:30:00Z",
                "next_close": "2024-03-04T21:00:00Z",
                "speed": speed,
                "wall": (datetime.now(UTC) - timedelta(seconds=1)).isoformat(),
            }
        )

    def command_t(order: dict[str, Any]) -> datetime | None:
        oid = UUID(order["id"])
        return next((c.t for c in broker.exchange.commands if getattr(c, "order_id", None) == oid), None)

    try:
        with broker.client(acct) as c:
            r.set(keys.CLOCK, clock(0.0))  # a clock that stands still (a finished replay)
            order: dict[str, Any] = {}

            def at_sim() -> bool:
                order.update(c.post("/v2/orders", json=body).json())
                return wait_for(lambda: command_t(order), what="the command") == sim

            wait_for(at_sim, what="a command at the simulation time")  # the broker caches the clock briefly
            created = datetime.fromisoformat(order["created_at"].replace("Z", "+00:00"))
            assert abs(created - datetime.now(UTC)) < timedelta(minutes=1)  # the row: the wall clock

            r.set(keys.CLOCK, clock(60.0))  # running x60, written a second ago: about a minute later now

            def moved_on() -> bool:
                order.update(c.post("/v2/orders", json=body).json())
                t = wait_for(lambda: command_t(order), what="the command")
                return sim + timedelta(seconds=55) <= t <= sim + timedelta(seconds=125)

            wait_for(moved_on, what="a command at the running simulation time")
            c.delete(f"/v2/orders/{order['id']}")
            cancel = wait_for(
                lambda: next(
                    (
                        x
                        for x in broker.exchange.commands
                        if type(x).__name__ == "CancelCmd" and str(x.order_id) == order["id"]
                    ),
                    None,
                ),
                what="the cancel",
            )
            assert cancel.t.year == 2024
    finally:
        r.delete(keys.CLOCK)
        r.close()


def _last_t(broker: Broker, acct: dict[str, Any]) -> datetime:
    return next(q.t for q in reversed(broker.exchange.risk_requests) if str(q.account_id) == acct["id"])


def test_buying_power_holds_under_concurrent_submits(broker: Broker) -> None:
    """20 resting buys at once against cash for 10: exactly 10 are accepted, never an 11th."""
    acct = broker.new_account(cash="1000")
    body = {"symbol": "MSFT", "qty": "1", "side": "buy", "type": "limit", "time_in_force": "gtc"}
    body["limit_price"] = "100"  # below MSFT's 200: rests, holding 100 of buying power

    def submit(_: int) -> Any:
        with broker.client(acct) as c:
            return c.post("/v2/orders", json=body)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(submit, range(20)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 10 + [403] * 10, [a.text for a in answers if a.status_code not in (200, 403)]
    assert all("insufficient buying power" in a.json()["message"] for a in answers if a.status_code == 403)
    with broker.client(acct) as c:
        assert Decimal(c.get("/v2/account").json()["buying_power"]) == 0
