"""The broker with the real risk and orderbook processes: alpaca-py orders matched by the real book."""

from __future__ import annotations

import random
import string
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
import redis
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderSide, OrderStatus, TimeInForce
from alpaca.trading.requests import LimitOrderRequest, MarketOrderRequest, ReplaceOrderRequest

from papertrade import keys
from papertrade.stack.infra import Endpoints
from tests.broker.conftest import real_exchange, wait_for
from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_orders_through_real_risk_and_orderbook(
    start_services: Any, infra: Endpoints, fresh_database_url: str
) -> None:
    sym = "RS" + "".join(random.choices(string.ascii_uppercase, k=4))
    risk_url, tag = real_exchange(start_services, infra.redis_url, fresh_database_url, sym, "100")
    _, url = start_services("broker", database_url=fresh_database_url, BROKER_LEDGER_DURABLE=f"broker-{tag}")
    with httpx.Client(base_url=url, headers=ADMIN) as adm:
        a = adm.post("/admin/accounts", json={"name": "buyer", "cash": "100000"}).json()
        b = adm.post("/admin/accounts", json={"name": "seller", "cash": "100000"}).json()
    ta = TradingClient(a["api_key_id"], a["api_secret_key"], paper=True, url_override=url)
    tb = TradingClient(b["api_key_id"], b["api_secret_key"], paper=True, url_override=url)

    def status(tc: TradingClient, oid: Any, st: OrderStatus) -> Any:
        return wait_for(
            lambda: (o := tc.get_order_by_id(oid)).status == st and o, timeout=20, what=f"{oid} {st}"
        )

    # the book opens the symbol's book from the watchlist; a resting bid, then a crossing sell
    bid = wait_for(
        lambda: _try(
            lambda: ta.submit_order(
                LimitOrderRequest(
                    symbol=sym, qty=10, side=OrderSide.BUY, time_in_force=TimeInForce.GTC, limit_price=100
                )
            )
        ),
        timeout=20,
        what="first order accepted",
    )
    status(ta, bid.id, OrderStatus.NEW)
    replaced = ta.replace_order_by_id(bid.id, ReplaceOrderRequest(qty=8))
    status(ta, bid.id, OrderStatus.REPLACED)
    status(ta, replaced.id, OrderStatus.NEW)
    ask = tb.submit_order(
        MarketOrderRequest(symbol=sym, qty=5, side=OrderSide.SELL, time_in_force=TimeInForce.DAY)
    )
    status(tb, ask.id, OrderStatus.FILLED)
    part = status(ta, replaced.id, OrderStatus.PARTIALLY_FILLED)
    assert Decimal(part.filled_qty) == 5 and Decimal(part.filled_avg_price) == 100
    assert Decimal(ta.get_open_position(sym).qty) == 5
    assert Decimal(tb.get_open_position(sym).qty) == -5
    assert Decimal(ta.get_account().cash) == Decimal("99500")
    assert Decimal(tb.get_account().cash) == Decimal("100500")
    ta.cancel_order_by_id(replaced.id)
    done = status(ta, replaced.id, OrderStatus.CANCELED)
    assert Decimal(done.filled_qty) == 5

    # the real risk service refuses past a limit: 403 naming the rule
    with httpx.Client(base_url=risk_url, headers=ADMIN) as rc:
        assert rc.put(f"/v1/limits/{a['id']}", json={"max_order_qty": 100}).status_code == 200
    with pytest.raises(APIError) as err:
        ta.submit_order(
            MarketOrderRequest(symbol=sym, qty=101, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
        )
    assert err.value.status_code == 403 and err.value.message.startswith("risk: ")
    assert "max_order_qty" in err.value.message

    # an order risk approved but the broker refused (buying power) is handed back on risk.release:
    # without it risk would still count 10 open shares and refuse the next 5 (max_position_qty 10)
    c = _new_account(url, "small", "1000")
    tc = TradingClient(c["api_key_id"], c["api_secret_key"], paper=True, url_override=url)
    with httpx.Client(base_url=risk_url, headers=ADMIN) as rc:
        assert rc.put(f"/v1/limits/{c['id']}", json={"max_position_qty": 10}).status_code == 200
    with pytest.raises(APIError) as err:
        tc.submit_order(_limit(sym, 10, 200))
    assert err.value.status_code == 403 and "insufficient buying power" in err.value.message
    small = wait_for(lambda: _try(lambda: tc.submit_order(_limit(sym, 5, 90))), timeout=20, what="released")
    status(tc, small.id, OrderStatus.NEW)

    # risk's trading-hours rule sees the streamer's simulation time (the wall clock here is irrelevant)
    r = redis.Redis.from_url(infra.redis_url)
    r.set(keys.CLOCK, orjson.dumps(_clock("2026-11-21T15:00:00Z")))  # a Saturday
    try:
        with httpx.Client(base_url=risk_url, headers=ADMIN) as rc:
            limits = {"max_position_qty": 100, "trading_hours": "regular"}
            assert rc.put(f"/v1/limits/{c['id']}", json=limits).status_code == 200

        def refused_closed() -> bool:
            try:
                tc.submit_order(_limit(sym, 1, 90))
            except APIError as exc:
                return exc.status_code == 403 and "trading_hours" in exc.message
            return False

        wait_for(refused_closed, timeout=20, what="trading_hours reject at the simulated Saturday")
        r.set(keys.CLOCK, orjson.dumps(_clock("2026-11-23T15:00:00Z")))  # a Monday, 10:00 in New York
        wait_for(lambda: _try(lambda: tc.submit_order(_limit(sym, 1, 90))), timeout=20, what="open session")
    finally:
        r.delete(keys.CLOCK)


def _new_account(url: str, name: str, cash: str) -> dict[str, Any]:
    with httpx.Client(base_url=url, headers=ADMIN) as adm:
        data: dict[str, Any] = adm.post("/admin/accounts", json={"name": name, "cash": cash}).json()
        return data


def _limit(sym: str, qty: int, price: int) -> LimitOrderRequest:
    return LimitOrderRequest(
        symbol=sym, qty=qty, side=OrderSide.BUY, time_in_force=TimeInForce.GTC, limit_price=price
    )


def _clock(t: str) -> dict[str, Any]:
    return {"timestamp": t, "is_open": False, "next_open": t, "next_close": t}


def _try(fn: Any) -> Any:
    try:
        return fn()
    except APIError:
        return None
