"""The broker driven by the real alpaca-py SDK (`TradingClient(..., url_override=...)`)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderSide, OrderStatus, QueryOrderStatus, TimeInForce
from alpaca.trading.requests import (
    ClosePositionRequest,
    GetAssetsRequest,
    GetOrdersRequest,
    LimitOrderRequest,
    MarketOrderRequest,
    ReplaceOrderRequest,
    StopOrderRequest,
)

from tests.broker.conftest import Broker, wait_for


def _client(broker: Broker, account: dict[str, Any]) -> TradingClient:
    return TradingClient(
        account["api_key_id"], account["api_secret_key"], paper=True, url_override=broker.url
    )


@pytest.fixture(scope="module")
def account(broker: Broker) -> dict[str, Any]:
    return broker.new_account(cash="100000")


@pytest.fixture(scope="module")
def tc(broker: Broker, account: dict[str, Any]) -> TradingClient:
    return _client(broker, account)


def _status(tc: TradingClient, order_id: Any, status: OrderStatus) -> Any:
    return wait_for(
        lambda: (o := tc.get_order_by_id(order_id)).status == status and o, what=f"order {order_id} {status}"
    )


def test_account(tc: TradingClient, account: dict[str, Any]) -> None:
    acct = tc.get_account()
    assert str(acct.id) == account["id"]
    assert acct.account_number == account["account_number"]
    assert acct.status.value == "ACTIVE"
    assert Decimal(acct.cash) == Decimal("100000")
    assert Decimal(acct.buying_power) == Decimal("100000")
    assert Decimal(acct.equity) == Decimal("100000")


def test_market_order_fills_and_position(tc: TradingClient) -> None:
    order = tc.submit_order(
        MarketOrderRequest(symbol="AAPL", qty=10, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
    )
    assert order.symbol == "AAPL" and order.qty == "10"
    assert order.status in (
        OrderStatus.PENDING_NEW,
        OrderStatus.ACCEPTED,
        OrderStatus.NEW,
        OrderStatus.FILLED,
    )
    filled = _status(tc, order.id, OrderStatus.FILLED)
    assert Decimal(filled.filled_qty) == 10 and Decimal(filled.filled_avg_price) == 100
    pos = tc.get_open_position("AAPL")
    assert Decimal(pos.qty) == 10 and Decimal(pos.avg_entry_price) == 100
    assert Decimal(pos.cost_basis) == 1000 and pos.side.value == "long"
    assert Decimal(tc.get_account().cash) == Decimal("99000")


def test_limit_order_rests_then_cancel(broker: Broker, tc: TradingClient) -> None:
    order = tc.submit_order(
        LimitOrderRequest(
            symbol="MSFT", qty=5, side=OrderSide.BUY, time_in_force=TimeInForce.GTC, limit_price=150
        )
    )
    new = _status(tc, order.id, OrderStatus.NEW)
    assert new.limit_price == "150" and new.type.value == "limit"
    # buying power is reserved by the open buy
    assert Decimal(tc.get_account().buying_power) == Decimal(tc.get_account().cash) - 750
    tc.cancel_order_by_id(order.id)
    canceled = _status(tc, order.id, OrderStatus.CANCELED)
    assert canceled.canceled_at is not None
    assert Decimal(tc.get_account().buying_power) == Decimal(tc.get_account().cash)
    with pytest.raises(APIError) as err:
        tc.cancel_order_by_id(order.id)
    assert err.value.status_code == 422


def test_stop_order_and_get_by_client_order_id(tc: TradingClient) -> None:
    coid = f"stop-{uuid.uuid4().hex[:8]}"
    order = tc.submit_order(
        StopOrderRequest(
            symbol="TSLA",
            qty=3,
            side=OrderSide.BUY,
            time_in_force=TimeInForce.DAY,
            stop_price=55,
            client_order_id=coid,
        )
    )
    assert order.client_order_id == coid and order.stop_price == "55"
    same = tc.get_order_by_client_id(coid)
    assert same.id == order.id
    _status(tc, order.id, OrderStatus.NEW)
    tc.cancel_order_by_id(order.id)
    _status(tc, order.id, OrderStatus.CANCELED)


def test_replace_order(broker: Broker, tc: TradingClient) -> None:
    order = tc.submit_order(
        LimitOrderRequest(
            symbol="MSFT", qty=4, side=OrderSide.BUY, time_in_force=TimeInForce.DAY, limit_price=150
        )
    )
    _status(tc, order.id, OrderStatus.NEW)
    new = tc.replace_order_by_id(order.id, ReplaceOrderRequest(qty=6, limit_price=151))
    assert new.id != order.id and new.replaces == order.id and new.qty == "6" and new.limit_price == "151"
    old = _status(tc, order.id, OrderStatus.REPLACED)
    assert old.replaced_by == new.id
    _status(tc, new.id, OrderStatus.NEW)
    broker.exchange.fill_resting(new.id)
    filled = _status(tc, new.id, OrderStatus.FILLED)
    assert Decimal(filled.filled_avg_price) == 151
    with pytest.raises(APIError) as err:  # a final order cannot be replaced
        tc.replace_order_by_id(new.id, ReplaceOrderRequest(qty=7))
    assert err.value.status_code == 422


def test_replace_below_filled_is_422(broker: Broker, tc: TradingClient) -> None:
    order = tc.submit_order(
        LimitOrderRequest(
            symbol="MSFT", qty=10, side=OrderSide.BUY, time_in_force=TimeInForce.GTC, limit_price=140
        )
    )
    _status(tc, order.id, OrderStatus.NEW)
    broker.exchange.fill_resting(order.id, qty=Decimal(4))
    _status(tc, order.id, OrderStatus.PARTIALLY_FILLED)
    with pytest.raises(APIError) as err:
        tc.replace_order_by_id(order.id, ReplaceOrderRequest(qty=3))
    assert err.value.status_code == 422 and err.value.code == 42210000
    tc.cancel_order_by_id(order.id)
    done = _status(tc, order.id, OrderStatus.CANCELED)
    assert Decimal(done.filled_qty) == 4


def test_list_and_filter_orders(tc: TradingClient) -> None:
    start = datetime.now(UTC) - timedelta(milliseconds=1)
    ids = []
    for sym, side in (("AAPL", OrderSide.BUY), ("MSFT", OrderSide.BUY), ("AAPL", OrderSide.SELL)):
        o = tc.submit_order(
            LimitOrderRequest(
                symbol=sym,
                qty=1,
                side=side,
                time_in_force=TimeInForce.GTC,
                limit_price=50 if side == OrderSide.BUY else 500,
            )
        )
        ids.append(o.id)
    for i in ids:
        _status(tc, i, OrderStatus.NEW)
    open_orders = tc.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN, after=start))
    assert {o.id for o in open_orders} == set(ids)
    aapl = tc.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN, symbols=["AAPL"], after=start))
    assert {o.id for o in aapl} == {ids[0], ids[2]}
    sells = tc.get_orders(GetOrdersRequest(status=QueryOrderStatus.ALL, side=OrderSide.SELL, after=start))
    assert [o.id for o in sells] == [ids[2]]
    asc = tc.get_orders(GetOrdersRequest(status=QueryOrderStatus.ALL, direction="asc", after=start, limit=2))
    assert [o.id for o in asc] == ids[:2]
    closed = tc.get_orders(GetOrdersRequest(status=QueryOrderStatus.CLOSED, limit=500))
    assert all(o.status not in (OrderStatus.NEW, OrderStatus.PENDING_NEW) for o in closed)
    result = tc.cancel_orders()
    assert {r.id for r in result} >= set(ids) and all(r.status == 200 for r in result)
    for i in ids:
        _status(tc, i, OrderStatus.CANCELED)
    assert tc.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN)) == []


def test_positions_and_close(broker: Broker) -> None:
    acct = broker.new_account(cash="50000")
    tc = _client(broker, acct)
    a = tc.submit_order(
        MarketOrderRequest(symbol="AAPL", qty=20, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
    )
    m = tc.submit_order(
        MarketOrderRequest(symbol="MSFT", qty=5, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
    )
    _status(tc, a.id, OrderStatus.FILLED)
    _status(tc, m.id, OrderStatus.FILLED)
    assert {p.symbol for p in tc.get_all_positions()} == {"AAPL", "MSFT"}
    broker.set_price("AAPL", "110")
    pos = tc.get_open_position("AAPL")
    assert Decimal(pos.market_value) == 2200 and Decimal(pos.unrealized_pl) == 200
    acct_view = tc.get_account()
    assert Decimal(acct_view.long_market_value) == 2200 + 1000
    assert Decimal(acct_view.equity) == Decimal(acct_view.cash) + 3200
    half = tc.close_position("AAPL", ClosePositionRequest(percentage="50"))
    assert half.side == OrderSide.SELL and half.qty == "10"
    _status(tc, half.id, OrderStatus.FILLED)
    assert Decimal(tc.get_open_position("AAPL").qty) == 10
    results = tc.close_all_positions(cancel_orders=True)
    assert {r.symbol for r in results} == {"AAPL", "MSFT"} and all(r.status == 200 for r in results)
    wait_for(lambda: tc.get_all_positions() == [], what="positions closed")
    # realised: 20 shares bought at 100, sold at 110 => +200
    wait_for(lambda: Decimal(tc.get_account().cash) == Decimal("50200"), what="cash 50200")
    with pytest.raises(APIError) as err:
        tc.get_open_position("AAPL")
    assert err.value.status_code == 404
    broker.set_price("AAPL", "100")


def test_clock_and_assets(tc: TradingClient) -> None:
    clock = tc.get_clock()
    assert clock.next_open > clock.timestamp or clock.is_open
    assets = tc.get_all_assets()
    assert {"AAPL", "MSFT", "BRK.B", "@BTCUSD"} <= {a.symbol for a in assets}
    crypto = tc.get_all_assets(GetAssetsRequest(asset_class="crypto"))
    assert [a.symbol for a in crypto] == ["@BTCUSD"]
    aapl = tc.get_asset("AAPL")
    assert aapl.tradable and aapl.exchange.value == "NASDAQ"
    assert tc.get_asset(aapl.id).symbol == "AAPL"
    with pytest.raises(APIError) as err:
        tc.get_asset("NOPE")
    assert err.value.status_code == 404


def test_insufficient_buying_power_is_403(broker: Broker) -> None:
    tc = _client(broker, broker.new_account(cash="1000"))
    with pytest.raises(APIError) as err:
        tc.submit_order(
            MarketOrderRequest(symbol="AAPL", qty=11, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
        )
    assert err.value.status_code == 403
    assert err.value.code == 40310000
    assert "insufficient buying power" in err.value.message


def test_open_orders_hold_buying_power(broker: Broker) -> None:
    tc = _client(broker, broker.new_account(cash="1000"))
    for _ in range(2):
        tc.submit_order(
            LimitOrderRequest(
                symbol="AAPL", qty=4, side=OrderSide.BUY, time_in_force=TimeInForce.GTC, limit_price=99
            )
        )
    with pytest.raises(APIError) as err:  # 792 held, 396 more does not fit in 1000
        tc.submit_order(
            LimitOrderRequest(
                symbol="AAPL", qty=4, side=OrderSide.BUY, time_in_force=TimeInForce.GTC, limit_price=99
            )
        )
    assert err.value.status_code == 403
    tc.cancel_orders()


def test_replace_counts_what_the_replaced_order_holds_once(broker: Broker) -> None:
    """1000 of cash, two buys holding 396 each: a replacement of one may use the 208 left plus the 396
    it releases (604), not the other order's holdings too."""
    tc = _client(broker, broker.new_account(cash="1000"))
    first, _ = (
        tc.submit_order(
            LimitOrderRequest(
                symbol="AAPL", qty=4, side=OrderSide.BUY, time_in_force=TimeInForce.GTC, limit_price=99
            )
        )
        for _ in range(2)
    )
    _status(tc, first.id, OrderStatus.NEW)
    with pytest.raises(APIError) as err:  # 693 > 604
        tc.replace_order_by_id(first.id, ReplaceOrderRequest(qty=7))
    assert err.value.status_code == 403 and "available: 604)" in err.value.message
    new = tc.replace_order_by_id(first.id, ReplaceOrderRequest(qty=6))  # 594 fits
    _status(tc, new.id, OrderStatus.NEW)
    assert Decimal(tc.get_account().buying_power) == Decimal(1000 - 594 - 396)
    tc.cancel_orders()


def test_shorting_disabled_refuses_naked_sell(broker: Broker) -> None:
    tc = _client(broker, broker.new_account(cash="10000", shorting_enabled=False))
    with pytest.raises(APIError) as err:
        tc.submit_order(
            MarketOrderRequest(symbol="AAPL", qty=1, side=OrderSide.SELL, time_in_force=TimeInForce.DAY)
        )
    assert err.value.status_code == 403 and "insufficient qty" in err.value.message


def test_short_sell_when_allowed(broker: Broker) -> None:
    tc = _client(broker, broker.new_account(cash="10000"))
    o = tc.submit_order(
        MarketOrderRequest(symbol="TSLA", qty=10, side=OrderSide.SELL, time_in_force=TimeInForce.DAY)
    )
    _status(tc, o.id, OrderStatus.FILLED)
    pos = tc.get_open_position("TSLA")
    assert pos.side.value == "short" and Decimal(pos.qty) == -10 and Decimal(pos.market_value) == -500
    acct = tc.get_account()
    assert Decimal(acct.cash) == 10500 and Decimal(acct.short_market_value) == -500
    assert Decimal(acct.equity) == 10000 and Decimal(acct.buying_power) == 9500


def test_risk_refusals(broker: Broker, account: dict[str, Any]) -> None:
    tc = _client(broker, account)
    tc._retry = 0  # alpaca-py retries 429s three times, 3 s apart, by default
    with pytest.raises(APIError) as err:
        tc.submit_order(
            MarketOrderRequest(symbol="RISKY", qty=1, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
        )
    assert err.value.status_code == 403 and err.value.message == "risk: max_order_qty 1000 exceeded"
    with pytest.raises(APIError) as err:
        tc.submit_order(
            MarketOrderRequest(symbol="THROT", qty=1, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
        )
    assert err.value.status_code == 429 and err.value.code == 42910000
    assert "max_orders_per_second" in err.value.message
    with pytest.raises(APIError) as err:  # risk does not answer: refused, never passed
        tc.submit_order(
            MarketOrderRequest(symbol="QUIET", qty=1, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
        )
    assert err.value.status_code == 403 and "risk" in err.value.message and "unavailable" in err.value.message
    clipped = tc.submit_order(
        MarketOrderRequest(symbol="CLIP", qty=50, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
    )
    assert clipped.qty == "5"


def test_unauthorized(broker: Broker) -> None:
    bad = TradingClient("PKNOPE", "wrong", paper=True, url_override=broker.url)
    with pytest.raises(APIError) as err:
        bad.get_account()
    assert err.value.status_code == 401 and err.value.code == 40110000
