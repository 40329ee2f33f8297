"""The backtester: callbacks and order methods through the real cores, figures against hand-computed
values (a hand-made series and a slice of a real file), determinism, the report and the CLI."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from papertrade.backtest import BacktestConfig, Backtester, run_backtest
from papertrade.bars import generate, load_file
from papertrade.bars.series import BarSeries, dt_to_ns
from papertrade.book.liquidity import LiquidityConfig
from papertrade.cli import main as cli_main
from papertrade.enums import Interval, OrderStatus
from papertrade.errors import ValidationError
from papertrade.ledger import CommissionModel
from papertrade.messages import TradeUpdate
from papertrade.models import Bar
from papertrade.strategy import Strategy
from tests.strategy.strategies import Recorder

T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def series(
    closes: Sequence[float | str],
    symbol: str = "TEST",
    interval: Interval = Interval.M1,
    start: datetime = T0,
) -> BarSeries:
    c = np.array([float(x) for x in closes])
    t = np.array([dt_to_ns(start + i * interval.delta) for i in range(len(c))], dtype=np.int64)
    return BarSeries(symbol, interval, t, c.copy(), c.copy(), c.copy(), c.copy(), np.full(len(c), 1000.0))


# --- callbacks and order methods ---------------------------------------------------------------


def test_callbacks_arrive_in_order_with_fills_and_updates() -> None:
    s = Recorder({"buy_on": [2], "sell_on": [4], "qty": 10})
    result = run_backtest(s, [series(["100"] * 12)], cash=Decimal(100000))
    calls = s.calls
    assert calls[0] == ("start",) and calls[-1] == ("stop",)
    bars = [c for c in calls if c[0] == "bar"]
    assert len(bars) == 12 and [b[2] for b in bars] == [T0 + timedelta(minutes=i) for i in range(12)]
    # the buy on bar 2: accepted ("new"), then filled (on_fill before on_order_update), before bar 3
    i = calls.index(("bar", "TEST", T0 + timedelta(minutes=1)))
    assert calls[i + 1] == ("update", "new", "new")
    # ask rung 0 of the default ladder: 100 * (1 + 5 bps) rounded up to the cent
    assert calls[i + 2] == ("fill", "fill", Decimal(10), Decimal("100.05"), Decimal(10))
    assert calls[i + 3] == ("update", "fill", "filled")
    assert calls[i + 4][0] == "bar"
    j = calls.index(("bar", "TEST", T0 + timedelta(minutes=3)))
    assert calls[j + 2] == ("fill", "fill", Decimal(10), Decimal("99.95"), Decimal(0))
    # on_periodic every 5 minutes of bar time (bar ends 14:35 and 14:40)
    periodic = [c[1] for c in calls if c[0] == "periodic"]
    assert periodic == [T0 + timedelta(minutes=5), T0 + timedelta(minutes=10)]
    assert result.raw.bars_seen == 12 and result.raw.orders_sent == 2
    assert result.raw.final_cash == Decimal(100000) - Decimal("1000.5") + Decimal("999.5")


class OrderZoo(Strategy):
    """Exercises every order method once, on fixed bars."""

    params: ClassVar[dict[str, Any]] = {}

    def on_start(self) -> None:
        self.n = 0
        self.updates: list[tuple[str, str, str]] = []
        self.seen: dict[str, Any] = {}

    def on_bar(self, bar: Bar) -> None:
        self.n += 1
        if self.n == 1:
            # rests far below the market (GTC), then canceled on bar 3
            self.low = self.buy(bar.symbol, 5, type="limit", limit_price="90", time_in_force="gtc")
            # rests, filled when the market comes down to it (bar 4 at 95)
            self.mid = self.buy(bar.symbol, 5, type="limit", limit_price="96", time_in_force="gtc")
            # refused: more than the cash
            self.big = self.buy(bar.symbol, 10_000)
            self.seen["open_after_submit"] = len(self.open_orders())
        elif self.n == 3:
            self.seen["open_before_cancel"] = {o.id for o in self.open_orders()}
            self.cancel(self.low)
        elif self.n == 5:
            self.seen["position"] = self.position(bar.symbol).qty
            self.seen["account"] = self.account()
            self.sell(bar.symbol, 3, type="limit", limit_price="200", time_in_force="gtc")
            self.sell(bar.symbol, 1, type="stop", stop_price="50", time_in_force="gtc")
        elif self.n == 6:
            self.seen["open_before_close_all"] = len(self.open_orders())
            self.close_all()
        elif self.n == 7:
            self.seen["final_positions"] = self.positions()
            self.seen["open_final"] = self.open_orders()

    def on_order_update(self, update: TradeUpdate) -> None:
        self.updates.append((update.event, update.order["type"], update.order["status"]))


def test_order_methods_through_the_engine() -> None:
    s = OrderZoo()
    result = run_backtest(s, [series(["100", "99", "98", "95", "97", "97", "97", "97"])])
    assert s.big.status is OrderStatus.REJECTED and "insufficient buying power" in (s.big.reason or "")
    assert s.low.status is OrderStatus.ACCEPTED  # the broker's answer; the book acknowledges after
    assert s.seen["open_after_submit"] == 2
    assert s.seen["open_before_cancel"] == {s.low.id, s.mid.id}
    assert s.seen["position"] == 5  # the 96 bid filled when the maker's asks came down to it
    assert s.seen["account"].cash == Decimal(100000) - 5 * Decimal(96)
    assert s.seen["open_before_close_all"] == 2
    assert s.seen["final_positions"] == [] and s.seen["open_final"] == []
    events = [u[0] for u in s.updates]
    assert events.count("rejected") == 1 and events.count("canceled") >= 3
    statuses = {o.id: o.status for o in result.raw.orders}
    assert statuses[s.low.id] is OrderStatus.CANCELED and statuses[s.mid.id] is OrderStatus.FILLED
    fills = result.fills
    assert list(fills["side"]) == ["buy", "sell"]
    assert fills.iloc[0]["price"] == Decimal(96) and fills.iloc[0]["liquidity"] == "maker"
    assert fills.iloc[1]["qty"] == Decimal(5)


class DayOrders(Strategy):
    def on_start(self) -> None:
        self.done = False

    def on_bar(self, bar: Bar) -> None:
        if not self.done:
            self.done = True
            self.day = self.buy(bar.symbol, 1, type="limit", limit_price="50", time_in_force="day")
            self.gtc = self.buy(bar.symbol, 1, type="limit", limit_price="50", time_in_force="gtc")


def test_day_orders_expire_at_the_session_close_gtc_orders_stay() -> None:
    day1 = datetime(2024, 1, 2, 20, 55, tzinfo=UTC)  # 15:55 New York, the close is 16:00
    bars = BarSeries.concat(
        [
            series(["100"] * 5, start=day1),
            series(["100"] * 3, start=datetime(2024, 1, 3, 14, 30, tzinfo=UTC)),
        ],
        "TEST",
        Interval.M1,
    )
    s = DayOrders()
    result = run_backtest(s, [bars])
    status = {o.id: o.status for o in result.raw.orders}
    assert status[s.day.id] is OrderStatus.EXPIRED
    assert status[s.gtc.id] is OrderStatus.NEW


def test_risk_limits_refuse_or_clip_orders_in_a_backtest() -> None:
    bars = [series(["100"] * 5)]
    s = Recorder({"buy_on": [1], "qty": 100})
    result = run_backtest(s, bars, config=BacktestConfig(limits={"max_order_qty": 50}))
    order = result.raw.orders[0]
    assert order.status is OrderStatus.REJECTED and order.reason is not None
    assert order.reason.startswith("risk: max_order_qty")
    s = Recorder({"buy_on": [1], "qty": 100})
    result = run_backtest(
        s, bars, config=BacktestConfig(limits={"max_order_qty": 50, "clip_to_limits": True})
    )
    assert result.raw.orders[0].filled_qty == Decimal(50)


def test_a_strategy_that_raises_is_paused_and_the_run_reports_it() -> None:
    from tests.strategy.strategies import Explodes

    result = run_backtest(Explodes(), [series(["100"] * 10)])
    assert result.raw.state == "error" and result.raw.bars_seen == 2
    assert result.error is not None and "boom on bar 2" in result.error
    assert "RuntimeError" in (result.raw.traceback or "")
    assert result.raw.bars == 10  # the market went on; the strategy did not
    assert "boom on bar 2" in result.to_html()


def test_history_is_the_contract_dataframe_up_to_now() -> None:
    seen: list[Any] = []

    class Reads(Strategy):
        def on_bar(self, bar: Bar) -> None:
            if bar.t == T0 + timedelta(minutes=11):
                seen.append(self.history(bar.symbol, "1m", 3))
                seen.append(self.history(bar.symbol, "5m", 5))
                seen.append(self.now())

    closes = [str(100 + i) for i in range(20)]
    run_backtest(Reads(), [series(closes)])
    h1, h5, now = seen
    assert list(h1.columns) == [("TEST", f) for f in ("open", "high", "low", "close", "volume")]
    assert str(h1.index.tz) == "UTC" and h1.index.is_monotonic_increasing
    assert list(h1[("TEST", "close")]) == [109.0, 110.0, 111.0]
    # complete 5m bars only: 14:30 and 14:35 (14:40 is still open at 14:42)
    assert list(h5.index) == [T0, T0 + timedelta(minutes=5)]
    assert list(h5[("TEST", "close")]) == [104.0, 109.0]
    assert now == T0 + timedelta(minutes=12)


# --- figures ---------------------------------------------------------------------------------------


def test_report_figures_match_hand_computed_values() -> None:
    # Four daily bars, buy and hold 100 shares; the maker's best ask is close * 1.0005 rounded up.
    closes = ["10", "11", "9", "12"]
    start = datetime(2024, 1, 2, 5, 0, tzinfo=UTC)  # New York midnight: daily bar stamps
    bars = series(closes, interval=Interval.D1, start=start)
    result = run_backtest(
        "papertrade.samples.buy_and_hold:BuyAndHold", [bars], params={"qty": 100}, cash=10_000
    )
    fill = Decimal("10.01")  # 10 * 1.0005 = 10.005 -> 10.01
    cash = Decimal(10_000) - 100 * fill
    assert result.raw.final_cash == cash == Decimal("8999")
    equity = [8999 + 100 * c for c in (10, 11, 9, 12)]  # 9999, 10099, 9899, 10199
    assert list(result.equity.to_numpy()) == equity
    s = result.stats
    assert s["final_equity"] == Decimal(10199)
    assert s["total_return"] == pytest.approx(10199 / 10000 - 1)
    returns = [equity[0] / 10000 - 1] + [equity[i] / equity[i - 1] - 1 for i in range(1, 4)]
    sharpe = statistics.mean(returns) / statistics.stdev(returns) * math.sqrt(252)
    downside = math.sqrt(sum(min(r, 0) ** 2 for r in returns) / len(returns))
    assert s["sharpe"] == pytest.approx(sharpe)
    assert s["sortino"] == pytest.approx(statistics.mean(returns) / downside * math.sqrt(252))
    assert s["max_drawdown"] == pytest.approx(9899 / 10099 - 1)
    years = 4 / 365.25  # Jan 2 05:00 to Jan 6 05:00
    assert s["cagr"] == pytest.approx((10199 / 10000) ** (1 / years) - 1)
    assert s["exposure"] == 1.0
    assert s["turnover"] == pytest.approx(1001 / statistics.mean(equity))
    assert s["fees"] == 0 and s["trades"] == 0 and s["win_rate"] is None
    assert len(result.trades) == 1 and result.trades.iloc[0]["exit_time"] is None


def test_report_figures_on_a_real_file_slice(shared_data: Path) -> None:
    orcl = load_file(shared_data / "orcl-1995-2014.txt")
    orcl = orcl.between(
        dt_to_ns(datetime(2014, 1, 1, tzinfo=UTC)), dt_to_ns(datetime(2014, 7, 1, tzinfo=UTC))
    )
    commission = CommissionModel.per_share("0.01", minimum="1")
    result = run_backtest(
        "papertrade.samples.sma_cross:SmaCross",
        [orcl],
        params={"fast": 3, "slow": 8, "qty": 100},
        config=BacktestConfig(cash=Decimal(100_000), commission=commission),
    )
    fills = result.raw.fills
    assert len(fills) >= 6 and result.error is None
    # every fill is an exact cent price on the maker's ladder around that day's close
    closes = dict(zip(orcl.t.tolist(), orcl.c.tolist(), strict=True))
    for f in fills:
        ref = Decimal(repr(closes[dt_to_ns(f.t) - 86_400 * 10**9]))
        if f.side.value == "buy":
            assert (
                f.price
                == (ref * Decimal("1.0005") / Decimal("0.01")).to_integral_value("ROUND_CEILING") / 100
            )
        else:
            assert (
                f.price == (ref * Decimal("0.9995") / Decimal("0.01")).to_integral_value("ROUND_FLOOR") / 100
            )
        assert f.fee == Decimal(1)  # 100 shares * 0.01 = 1.00, the minimum
    # cash, fees and the figures, recomputed by hand from the fills
    cash = Decimal(100_000)
    pos = Decimal(0)
    for f in fills:
        signed = f.qty if f.side.value == "buy" else -f.qty
        cash -= signed * f.price + f.fee
        pos += signed
    assert result.raw.final_cash == cash
    assert result.stats["fees"] == Decimal(len(fills))
    last_close = Decimal(repr(float(orcl.c[-1])))
    assert result.stats["final_equity"] == cash + pos * last_close
    assert result.stats["total_return"] == pytest.approx(float((cash + pos * last_close) / 100_000 - 1))
    trips = []
    for buy, sell in zip(fills[0::2], fills[1::2], strict=False):
        assert buy.side.value == "buy" and sell.side.value == "sell"
        trips.append((sell.price - buy.price) * 100 - buy.fee - sell.fee)
    assert [t for t in result.trades["pnl"] if t is not None] == trips
    assert result.stats["win_rate"] == pytest.approx(sum(1 for t in trips if t > 0) / len(trips))
    notional = sum(float(f.qty * f.price) for f in fills)
    assert result.stats["turnover"] == pytest.approx(notional / float(np.mean(result.raw.equity)))
    in_market = np.count_nonzero(result.raw.exposure > 0) / len(orcl)
    assert result.stats["exposure"] == pytest.approx(in_market)


def test_same_inputs_give_identical_fills() -> None:
    data = [
        generate("AAPL", datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 9, tzinfo=UTC), seed=3),
        generate("MSFT", datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 9, tzinfo=UTC), seed=3),
    ]

    def run(entrypoint: str, params: dict[str, Any]) -> Any:
        r = run_backtest(entrypoint, data, params=params)
        return [(f.t, f.symbol, f.side, f.qty, f.price, f.order_id, f.execution_id) for f in r.raw.fills], r

    for entrypoint, params in (
        ("papertrade.samples.sma_cross:SmaCross", {"fast": 5, "slow": 20}),
        ("papertrade.samples.mean_reversion:MeanReversion", {"window": 15}),
    ):
        a, ra = run(entrypoint, params)
        b, rb = run(entrypoint, params)
        assert a and a == b
        assert ra.stats["final_equity"] == rb.stats["final_equity"]
        assert {f[1] for f in a} == {"AAPL", "MSFT"}


def test_html_report_and_cli(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    trades = tmp_path / "trades.csv"
    rc = cli_main(
        [
            "backtest",
            "papertrade.samples.sma_cross:SmaCross",
            "--data",
            str(shared_data / "orcl-1995-2014.txt"),
            "--start",
            "2013-01-01",
            "--end",
            "2014-12-31",
            "--interval",
            "1d",
            "--params",
            '{"fast": 5, "slow": 20, "qty": 50}',
            "--report",
            str(out),
            "--trades",
            str(trades),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    for label in (
        "total return",
        "CAGR",
        "Sharpe",
        "Sortino",
        "max drawdown",
        "win rate",
        "exposure",
        "turnover",
        "fees",
    ):
        assert label in text
    page = out.read_text()
    assert "plotly" in page.lower() and "ORCL buy" in page and "ORCL sell" in page and "drawdown" in page
    assert trades.read_text().startswith("symbol,side,qty,entry_time")
    assert cli_main(["backtest", "nope.nope:Nope", "--no-progress"]) == 2
    assert (
        cli_main(["backtest", "papertrade.samples.sma_cross:SmaCross", "--params", "[1]", "--no-progress"])
        == 2
    )


def test_bad_backtest_inputs_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least one symbol"):
        Backtester(Recorder(), [])
    with pytest.raises(ValidationError, match="same interval"):
        Backtester(Recorder(), [series(["1"]), series(["1"], symbol="B", interval=Interval.M5)])


def test_liquidity_off_means_only_the_strategys_orders() -> None:
    s = Recorder({"buy_on": [1], "qty": 5})
    result = run_backtest(
        s, [series(["100"] * 3)], config=BacktestConfig(liquidity=LiquidityConfig(), liquidity_enabled=False)
    )
    order = result.raw.orders[0]
    assert (
        order.status is OrderStatus.CANCELED and order.filled_qty == 0
    )  # a market order with no one to meet


@pytest.mark.parametrize(
    ("entrypoint", "params"),
    [
        ("papertrade.samples.sma_cross:SmaCross", {"fast": 5, "slow": 20}),
        ("papertrade.samples.mean_reversion:MeanReversion", {"window": 15, "k": 1.0}),
        ("papertrade.samples.breakout_stop:BreakoutStop", {"lookback": 10}),
        ("tests.strategy.strategies:Recorder", {"buy_on": [5, 6, 7], "sell_on": [100, 300]}),
    ],
)
def test_the_lean_single_symbol_loop_equals_the_general_loop(entrypoint: str, params: dict[str, Any]) -> None:
    from papertrade.strategy.loader import build_strategy

    data = [generate("AAPL", datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 7, tzinfo=UTC), seed=5)]
    outs = []
    for general in (False, True):
        tester = Backtester(build_strategy(entrypoint, params), data)
        tester.general_loop = general
        raw = tester.run()
        assert raw.error is None
        outs.append(
            (
                [(f.t, f.side, f.qty, f.price, f.order_id) for f in raw.fills],
                [(o.id, o.status, o.filled_qty) for o in raw.orders],
                raw.final_equity,
                raw.bars_seen,
                list(raw.equity),
            )
        )
    assert outs[0] == outs[1]
    assert outs[0][1]
