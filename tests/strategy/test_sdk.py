"""The SDK without a market: params, order arguments, entrypoints, the driver's error handling."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

import pytest

import papertrade
from papertrade.enums import Interval, OrderType, Side, TimeInForce
from papertrade.errors import ValidationError
from papertrade.models import Bar
from papertrade.strategy import (
    Driver,
    ParamsError,
    State,
    Strategy,
    StrategyLoadError,
    StrategyNotBound,
    build_strategy,
    load_strategy_class,
)
from papertrade.strategy.base import make_request, resolve_params
from papertrade.strategy.wire import order_from_alpaca, order_to_alpaca


class Tunable(Strategy):
    """A strategy with one of every param type."""

    params: ClassVar[dict[str, Any]] = {
        "n": 3,
        "x": 0.5,
        "name": "a",
        "on": True,
        "d": Decimal("1.5"),
        "ls": [],
    }

    @classmethod
    def check_params(cls, params: Any) -> None:
        if params["n"] > 100:
            raise ValueError("n must be at most 100")


def test_strategy_is_exported_from_the_package() -> None:
    assert papertrade.Strategy is Strategy


def test_params_defaults_overrides_and_attribute_access() -> None:
    s = Tunable({"n": "7", "x": 2, "d": "2.25", "ls": [1, 2]})
    assert s.p.n == 7 and s.p.x == 2.0 and s.p.d == Decimal("2.25") and s.p.ls == [1, 2]
    assert s.p.name == "a" and s.p.on is True
    assert Tunable().p == {"n": 3, "x": 0.5, "name": "a", "on": True, "d": Decimal("1.5"), "ls": []}
    with pytest.raises(AttributeError, match="no param"):
        _ = s.p.missing


@pytest.mark.parametrize(
    ("given", "needle"),
    [
        ({"zzz": 1}, "unknown param 'zzz'"),
        ({"n": "many"}, "must be an integer"),
        ({"n": 1.5}, "must be an integer"),
        ({"n": True}, "must be an integer"),
        ({"x": "fast"}, "must be a number"),
        ({"on": "yes"}, "true or false"),
        ({"name": 3}, "must be a string"),
        ({"ls": "x"}, "must be a list"),
        ({"d": "abc"}, "decimal"),
        ({"n": 1000}, "at most 100"),
    ],
)
def test_bad_params_are_refused_with_the_reason(given: dict[str, Any], needle: str) -> None:
    with pytest.raises(ParamsError, match=needle):
        resolve_params(Tunable, given)


def test_order_arguments_are_validated() -> None:
    r = make_request("aapl", "buy", 10, type="limit", limit_price="187.5", time_in_force="gtc")
    assert (r.symbol, r.side, r.type, r.time_in_force) == ("AAPL", Side.BUY, OrderType.LIMIT, TimeInForce.GTC)
    assert r.qty == Decimal(10) and r.limit_price == Decimal("187.5")
    r = make_request("AAPL", Side.SELL, notional="1000")
    assert r.notional == Decimal(1000) and r.qty is None
    bad = [
        ({"qty": None}, "qty"),
        ({"qty": 1, "notional": 5}, "exactly one"),
        ({"qty": -1}, "greater than 0"),
        ({"qty": "ten"}, "decimal"),
        ({"type": "limit"}, "limit_price"),
        ({"type": "stop"}, "stop_price"),
        ({"type": "market", "limit_price": 5}, "must not be set"),
        ({"type": "trailing"}, "type"),
        ({"time_in_force": "forever"}, "time_in_force"),
        ({"side": "hold"}, "side"),
        ({"symbol": "bad symbol!"}, "symbol"),
        ({"notional": 5, "qty": None, "type": "limit", "limit_price": 1}, "market"),
    ]
    for change, needle in bad:
        args: dict[str, Any] = {"symbol": "AAPL", "side": "buy", "qty": 1, **change}
        with pytest.raises(ValidationError, match=needle):
            make_request(args.pop("symbol"), args.pop("side"), args.pop("qty"), **args)


def test_trading_before_the_strategy_runs_says_so() -> None:
    with pytest.raises(StrategyNotBound, match="not running yet"):
        Tunable().buy("AAPL", 1)


def test_entrypoints_load_or_say_why_not() -> None:
    assert load_strategy_class("papertrade.samples.sma_cross:SmaCross").__name__ == "SmaCross"
    assert load_strategy_class("papertrade.samples.sma_cross.SmaCross").__name__ == "SmaCross"
    for entrypoint, needle in (
        ("", "empty"),
        ("nodots", "form"),
        ("no_such_pkg_abc:X", "cannot import"),
        ("papertrade.samples.sma_cross:Missing", "no attribute"),
        ("papertrade.models:Bar", "not a subclass"),
        ("papertrade.strategy:Strategy", "itself"),
    ):
        with pytest.raises(StrategyLoadError, match=needle):
            load_strategy_class(entrypoint)
    with pytest.raises(StrategyLoadError, match="bad params"):
        build_strategy("papertrade.samples.sma_cross:SmaCross", {"fast": 50, "slow": 10})
    assert build_strategy("papertrade.samples.sma_cross:SmaCross", {"fast": 2}).p.fast == 2


class _NullContext:
    """Just enough context for the driver tests (no orders)."""

    def now(self) -> datetime:
        return datetime(2024, 1, 2, tzinfo=UTC)


class _Flaky(Strategy):
    def on_start(self) -> None:
        self.seen: list[int] = []

    def on_bar(self, bar: Bar) -> None:
        self.seen.append(bar.t.minute)
        if bar.t.minute == 2:
            raise ZeroDivisionError("bad math")


def _bar(minute: int) -> Bar:
    px = Decimal(100)
    return Bar(
        symbol="AAPL",
        interval=Interval.M1,
        t=datetime(2024, 1, 2, 15, minute, tzinfo=UTC),
        o=px,
        h=px,
        l=px,
        c=px,
        v=Decimal(1),
    )


def test_a_raising_callback_pauses_the_strategy_and_is_reported() -> None:
    errors: list[str] = []
    strategy = _Flaky()
    driver = Driver(strategy, _NullContext(), ("AAPL",), Interval.M1, on_error=lambda m, tb: errors.append(m))  # type: ignore[arg-type]
    assert driver.start()
    for minute in range(5):
        driver.bar(_bar(minute))
    assert strategy.seen == [0, 1, 2]
    assert driver.state is State.ERROR and driver.bars_seen == 3
    assert driver.last_error == "on_bar: ZeroDivisionError: bad math"
    assert errors == [driver.last_error] and "ZeroDivisionError" in (driver.last_traceback or "")
    driver.resume()
    driver.bar(_bar(3))
    assert strategy.seen[-1] == 3 and driver.state is State.RUNNING
    driver.stop()
    assert driver.state is State.STOPPED


def test_alpaca_order_json_round_trips() -> None:
    from uuid import uuid4

    from papertrade.models import Order

    t = datetime(2024, 1, 2, 15, 0, tzinfo=UTC)
    order = Order(
        id=uuid4(),
        client_order_id="c1",
        account_id=uuid4(),
        symbol="BRK.B",
        side=Side.SELL,
        type=OrderType.STOP_LIMIT,
        time_in_force=TimeInForce.GTC,
        created_at=t,
        updated_at=t,
        submitted_at=t,
        qty=Decimal("5"),
        limit_price=Decimal("401.5"),
        stop_price=Decimal("402"),
        filled_qty=Decimal("2"),
        filled_avg_price=Decimal("401.75"),
    )
    data = order_to_alpaca(order)
    assert (
        data["qty"] == "5" and data["limit_price"] == "401.5" and data["created_at"] == "2024-01-02T15:00:00Z"
    )
    back = order_from_alpaca(data, order.account_id)
    assert back == order
