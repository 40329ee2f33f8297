"""End to end: the five services as processes under `Stack` (the runner of `make up`) on their own
embedded NATS, Postgres and Redis; a synthetic feed in accelerated mode (a simulated minute a second,
24/7); a strategy deployed over the strategy-runner's REST that trades on every bar; a second
account trading against it over alpaca-py; a risk limit set mid-run; SIGKILL of the orderbook, the
broker and the strategy-runner, each restarted by the stack's supervisor; and at the end the proofs
that nothing was lost or applied twice (EX_EXEC vs Postgres), that the books equal the open orders in
Postgres, and that cash and positions obey the ledger invariant to the cent.

The tests of this module run in order on one stack (module fixture); each is a phase of one run.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
import redis
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderSide, OrderStatus, QueryOrderStatus, TimeInForce
from alpaca.trading.requests import (
    GetOrdersRequest,
    LimitOrderRequest,
    MarketOrderRequest,
    ReplaceOrderRequest,
)

from papertrade import codec
from papertrade.bus import subjects
from papertrade.bus.connect import connect_nats
from papertrade.enums import ExecType
from papertrade.messages import ExecReport
from papertrade.stack.infra import Endpoints
from papertrade.stack.runner import READY, Stack
from papertrade_orderbook.exchange import SNAPSHOT_KEY
from tests.broker.holds import check_holds
from tests.conftest import ADMIN_TOKEN, REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LIQUID = "E2ELIQ"  # synthetic liquidity on: the strategy's market orders fill against it
QUIET = "E2EQT"  # liquidity off: the strategy's resting bid, the second account sells into it
CASH = Decimal("1000000")
CENT = Decimal("0.01")
INFRA_VARS = ("NATS_URL", "DATABASE_URL", "REDIS_URL")


class Run:
    """The running stack and what the phases share."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.urls = stack.urls
        self.http = httpx.Client(timeout=30.0)
        self.strategy_account: dict[str, Any] = {}
        self.other_account: dict[str, Any] = {}
        self.sample_account: dict[str, Any] = {}
        self.strategy_id = ""
        self.sample_id = ""
        self.bars_before_restarts = 0

    def url(self, service: str, path: str) -> str:
        return self.urls[service] + path

    def client(self, account: dict[str, Any]) -> Any:  # alpaca-py's answers are unions
        return TradingClient(
            account["api_key_id"], account["api_secret_key"], paper=True, url_override=self.urls["broker"]
        )

    def strategy(self, sid: str | None = None) -> dict[str, Any]:
        r = self.http.get(self.url("strategy-runner", f"/v1/strategies/{sid or self.strategy_id}"))
        assert r.status_code == 200, r.text
        return r.json()

    def pid(self, service: str) -> int | None:
        return next((row.pid for row in self.stack.status() if row.name == service), None)

    def state(self, service: str) -> str:
        return next((row.state for row in self.stack.status() if row.name == service), "?")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    env = {k: v for k, v in os.environ.items() if k not in INFRA_VARS}
    env.update(
        {
            "PAPERTRADE_ADMIN_TOKEN": ADMIN_TOKEN,
            "LOG_LEVEL": "INFO",
            # the strategy-runner's children import tests.e2e.strategies
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
            "STREAMER_FEED": "synthetic",
            "STREAMER_MODE": "accelerated",
            "STREAMER_SPEED": "60",
            "STREAMER_HOURS": "24/7",
            "STREAMER_SYMBOLS": f"{LIQUID},{QUIET}",
            "STREAMER_INTERVALS": "1m",
            "STREAMER_SEED": "8",
            "ORDERBOOK_WATCHLIST_POLL_SECONDS": "0.5",
            # snapshots often enough that the orderbook's restart is snapshot + the stream's tail (a
            # bar makes one command per symbol: the maker's re-quote is one QuoteCmd)
            "ORDERBOOK_SNAPSHOT_EVERY": "20",
        }
    )
    data_dir: Path = tmp_path_factory.mktemp("e2e-stack")
    stack = Stack(data_dir, env=env, free_ports=True, persist=False, demo=None, ready_timeout=90.0)
    with stack:
        r = Run(stack)
        try:
            yield r
        finally:
            r.http.close()


def test_strategy_trades_through_risk_and_the_book(run: Run) -> None:
    http = run.http
    for name in ("strategy", "other", "sample"):
        r = http.post(
            run.url("broker", "/admin/accounts"), json={"name": name, "cash": str(CASH)}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        setattr(run, f"{name}_account", r.json())
    _wait(lambda: {LIQUID, QUIET} <= set(http.get(run.url("orderbook", "/v1/symbols")).json()), "books open")
    r = http.put(run.url("orderbook", f"/v1/books/{QUIET}/liquidity"), json={"enabled": False}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["enabled"] is False, r.text
    _wait(lambda: _book_orders(run, QUIET) == [], f"no synthetic orders on {QUIET}")

    body = {
        "name": "e2e-pingpong",
        "entrypoint": "tests.e2e.strategies:PingPong",
        "params": {"liquid": LIQUID, "quiet": QUIET, "qty": 1},
        "symbols": [LIQUID, QUIET],
        "interval": "1m",
        "account_id": run.strategy_account["id"],
    }
    r = http.post(run.url("strategy-runner", "/v1/strategies"), json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    run.strategy_id = r.json()["id"]
    # and the shipped SMA-crossover sample, on its own account, fast averages so it trades soon
    sample = {
        "name": "e2e-sma",
        "entrypoint": "papertrade.samples.sma_cross:SmaCross",
        "params": {"fast": 2, "slow": 5, "qty": 3},
        "symbols": [LIQUID],
        "interval": "1m",
        "account_id": run.sample_account["id"],
    }
    r = http.post(run.url("strategy-runner", "/v1/strategies"), json=sample, headers=ADMIN)
    assert r.status_code == 201, r.text
    run.sample_id = r.json()["id"]

    # bars reach it; its market orders pass risk and fill against the synthetic liquidity
    st = _wait(lambda: (s := run.strategy())["bars_seen"] >= 4 and s["fills"] >= 2 and s, "strategy fills")
    assert st["status"] == "running", st
    trader = run.client(run.strategy_account)
    pos = trader.get_open_position(LIQUID)
    assert Decimal(pos.qty) > 0

    # its limit bid rests on the quiet book; the second account sells into it
    _sell_into_resting_bid(run)
    # the fill's trade update reached the strategy (fills counts broker.event updates)
    fills = run.strategy()["fills"]
    _wait(lambda: run.strategy()["fills"] > fills, "more fills reach the strategy")


def test_cancel_and_replace_over_alpaca_while_the_strategy_trades(run: Run) -> None:
    other = run.client(run.other_account)
    orders_before = run.strategy()["orders_sent"]
    low = (_last_close(run, LIQUID) * Decimal("0.5")).quantize(CENT, rounding=ROUND_DOWN)
    bid = other.submit_order(
        LimitOrderRequest(
            symbol=LIQUID, qty=5, side=OrderSide.BUY, time_in_force=TimeInForce.GTC, limit_price=float(low)
        )
    )
    _wait_status(other, bid.id, OrderStatus.NEW)
    smaller = other.replace_order_by_id(bid.id, ReplaceOrderRequest(qty=3))
    assert str(smaller.replaces) == str(bid.id)
    _wait_status(other, bid.id, OrderStatus.REPLACED)
    _wait_status(other, smaller.id, OrderStatus.NEW)
    lower = low - Decimal(1)
    moved = other.replace_order_by_id(smaller.id, ReplaceOrderRequest(limit_price=float(lower)))
    _wait_status(other, smaller.id, OrderStatus.REPLACED)
    o = _wait_status(other, moved.id, OrderStatus.NEW)
    assert Decimal(o.qty) == 3 and Decimal(o.limit_price) == lower
    # the book holds exactly the latest version
    book_ids = {b["id"] for b in _book_orders(run, LIQUID) if b["account_id"] == run.other_account["id"]}
    assert book_ids == {str(moved.id)}
    other.cancel_order_by_id(moved.id)
    _wait_status(other, moved.id, OrderStatus.CANCELED)
    _wait(
        lambda: all(b["account_id"] != run.other_account["id"] for b in _book_orders(run, LIQUID)),
        "the canceled order left the book",
    )
    # and the strategy went on trading meanwhile
    _wait(lambda: run.strategy()["orders_sent"] > orders_before, "strategy still sends orders")


def test_a_risk_limit_set_mid_run_rejects_the_next_order_with_403(run: Run) -> None:
    other = run.client(run.other_account)
    acct = run.other_account["id"]
    r = run.http.put(run.url("risk", f"/v1/limits/{acct}"), json={"max_order_qty": 2}, headers=ADMIN)
    assert r.status_code == 200, r.text
    with pytest.raises(APIError) as err:
        other.submit_order(
            MarketOrderRequest(symbol=LIQUID, qty=3, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
        )
    assert err.value.status_code == 403
    assert "max_order_qty" in str(err.value)
    ok = other.submit_order(
        MarketOrderRequest(symbol=LIQUID, qty=2, side=OrderSide.BUY, time_in_force=TimeInForce.DAY)
    )
    _wait_status(other, ok.id, OrderStatus.FILLED)
    r = run.http.put(run.url("risk", f"/v1/limits/{acct}"), json={}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["max_order_qty"] is None


@pytest.mark.parametrize("service", ["orderbook", "broker", "strategy-runner"])
def test_sigkill_and_restart(run: Run, service: str) -> None:
    if not run.bars_before_restarts:
        run.bars_before_restarts = run.strategy()["bars_seen"]
    old = run.pid(service)
    assert old is not None
    if service == "orderbook":  # the restart below starts from a snapshot, not the first command
        _wait(lambda: _snapshot_seq(run) > 0, "an orderbook snapshot in Redis")
    os.kill(old, signal.SIGKILL)
    # a new pid (status() shows None while the killed one is not yet noticed), and ready again
    _wait(
        lambda: (pid := run.pid(service)) is not None and pid != old and run.state(service) == READY,
        f"{service} restarted",
        timeout=90,
    )
    if service == "orderbook":
        log = (run.stack.log_dir / "orderbook.log").read_text()
        assert "books restored from snapshot" in log, [
            line for line in log.splitlines() if "snapshot" in line or "replay" in line
        ]
    # the whole loop works again: the strategy's bid rests and fills against the second account
    _sell_into_resting_bid(run)


def test_after_restarts_nothing_lost_or_doubled_and_books_match(run: Run) -> None:
    seen = run.bars_before_restarts
    st = _wait(
        lambda: (s := run.strategy())["status"] == "running" and s["bars_seen"] > seen + 3 and s,
        "the strategy resumed",
        timeout=60,
    )
    assert st["last_error"] in (None, ""), st
    n = st["orders_sent"]
    _wait(lambda: run.strategy()["orders_sent"] > n, "the strategy sends orders again")
    # the container the killed runner had started is gone: one process trades for the deployment
    _wait(lambda: len(_containers(run.strategy_id)) == 1, "one strategy process", timeout=30)
    # the SMA-crossover sample ran through it all too, and traded; it may have sent its first order
    # on its tenth bar, so wait for the bars rather than assert a count at the moment of that order
    sma = _wait(
        lambda: (
            (s := run.strategy(run.sample_id))["status"] == "running"
            and s["orders_sent"] >= 1
            and s["bars_seen"] > 10
            and s
        ),
        "the SMA sample trades past ten bars",
        timeout=60,
    )
    assert sma["last_error"] in (None, ""), sma
    assert len(_containers(run.sample_id)) == 1

    # freeze: stop the strategy, withdraw the synthetic liquidity; then every book must equal the
    # orders open in Postgres
    r = run.http.post(run.url("strategy-runner", f"/v1/strategies/{run.strategy_id}/stop"), headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
    assert _containers(run.strategy_id) == []
    r = run.http.post(run.url("strategy-runner", f"/v1/strategies/{run.sample_id}/stop"), headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
    r = run.http.put(
        run.url("orderbook", f"/v1/books/{LIQUID}/liquidity"), json={"enabled": False}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    accounts = [run.strategy_account, run.other_account, run.sample_account]
    for symbol in (LIQUID, QUIET):
        _wait(
            functools.partial(_levels_match, run, accounts, symbol),
            f"{symbol} book = open orders",
        )
        book = {o["id"]: Decimal(o["leaves_qty"]) for o in _book_orders(run, symbol)}
        opened = {
            str(o.id): Decimal(o.qty) - Decimal(o.filled_qty)
            for a in accounts
            for o in _open_orders(run, a)
            if o.symbol == symbol
        }
        assert book == opened, symbol

    # every fill report of EX_EXEC is in Postgres exactly once, and nothing else is
    ids = [UUID(a["id"]) for a in accounts]
    reports = asyncio.run(_exec_fills(_endpoints(run).nats_url, set(ids)))
    keys = Counter((r.exec_id, r.order_id) for r in reports)
    assert keys and max(keys.values()) == 1, [k for k, c in keys.items() if c > 1][:5]
    stream = {(str(r.exec_id), r.order_id): (r.qty, r.price) for r in reports}

    def in_db() -> dict[tuple[str, UUID], tuple[Decimal, Decimal]]:
        rows = _sql(
            run, "select exec_id, order_id, qty, price from executions where account_id = any(%s)", ids
        )
        return {(e, o): (q, p) for e, o, q, p in rows}

    db = _wait(lambda: (d := in_db()) == stream and d, "Postgres executions = EX_EXEC fills", timeout=30)
    assert len(db) == len(stream)

    # orders: filled_qty is the sum of their executions
    per_order: dict[UUID, Decimal] = defaultdict(Decimal)
    for (_, oid), (qty, _) in db.items():
        per_order[oid] += qty
    for oid, filled in _sql(run, "select id, filled_qty from orders where account_id = any(%s)", ids):
        assert filled == per_order.get(oid, Decimal(0)), oid

    # positions = sum of signed fills; cash + position cost = starting cash - fees + realised P&L
    signed: dict[tuple[UUID, str], Decimal] = defaultdict(Decimal)
    for acct, symbol, side, qty in _sql(
        run, "select account_id, symbol, side, qty from executions where account_id = any(%s)", ids
    ):
        signed[(acct, symbol)] += qty if side == "buy" else -qty
    for account in accounts:
        aid = UUID(account["id"])
        client = run.client(account)
        rest_positions = {p.symbol: p for p in client.get_all_positions()}
        for symbol in (LIQUID, QUIET):
            expect = signed.get((aid, symbol), Decimal(0))
            got = Decimal(rest_positions[symbol].qty) if symbol in rest_positions else Decimal(0)
            assert got == expect, (account["id"], symbol, got, expect)
        [(cash, start, fees, realized)] = _sql(
            run, "select cash, starting_cash, fees, realized_pl from accounts where id = %s", aid
        )
        costs = dict(_sql(run, "select symbol, cost from positions where account_id = %s", aid))
        cost = sum(costs.values(), Decimal(0))
        assert cash + cost == start - fees + realized, (account["id"], cash, cost, start, fees, realized)
        # REST shows each position's cost basis in cents (so their sum may be a cent off the exact one)
        rest_costs = {s: Decimal(p.cost_basis) for s, p in rest_positions.items()}
        assert rest_costs == {s: c.quantize(CENT) for s, c in costs.items() if s in rest_costs}
        assert all(c == 0 for s, c in costs.items() if s not in rest_costs), costs
        assert Decimal(client.get_account().cash).quantize(CENT) == cash.quantize(CENT)
        # what its open orders hold (`order_holds`, kept by triggers) is their sum
        with psycopg.connect(_endpoints(run).database_url.replace("+psycopg", "")) as conn:
            check_holds(conn, aid)
    assert start == CASH


# --- helpers ---------------------------------------------------------------------------------------


def _sell_into_resting_bid(run: Run) -> None:
    """Wait for the strategy's limit bid on QUIET, sell into it from the second account, check both fill."""
    trader = run.client(run.strategy_account)
    other = run.client(run.other_account)

    def resting() -> Any:
        book = _book_orders(run, QUIET)
        mine = [o for o in book if o["account_id"] == run.strategy_account["id"] and o["side"] == "buy"]
        return mine[0] if mine else None

    bid = _wait(resting, "the strategy's bid rests on the quiet book", timeout=60)
    sell = _wait(
        lambda: _try(
            lambda: other.submit_order(
                MarketOrderRequest(symbol=QUIET, qty=1, side=OrderSide.SELL, time_in_force=TimeInForce.DAY)
            )
        ),
        "the second account's sell is accepted",
    )
    _wait_status(other, sell.id, OrderStatus.FILLED)
    filled = _wait_status(trader, UUID(bid["id"]), OrderStatus.FILLED)
    assert Decimal(filled.filled_avg_price) == Decimal(bid["limit_price"])


def _levels_match(run: Run, accounts: list[dict[str, Any]], symbol: str) -> bool:
    return _book_levels(run, symbol) == _open_levels(run, accounts, symbol)


def _book_orders(run: Run, symbol: str) -> list[dict[str, Any]]:
    r = run.http.get(run.url("orderbook", f"/v1/books/{symbol}/orders"), headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["orders"]


def _book_levels(run: Run, symbol: str) -> dict[str, list[tuple[Decimal, Decimal, int]]]:
    r = run.http.get(run.url("orderbook", f"/v1/books/{symbol}"), params={"depth": 1000})
    assert r.status_code == 200, r.text
    body = r.json()
    return {
        side: [(Decimal(lv["price"]), Decimal(lv["qty"]), int(lv["orders"])) for lv in body[side]]
        for side in ("bids", "asks")
    }


def _open_orders(run: Run, account: dict[str, Any]) -> list[Any]:
    orders = run.client(account).get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN, limit=500))
    return list(orders)


def _open_levels(
    run: Run, accounts: list[dict[str, Any]], symbol: str
) -> dict[str, list[tuple[Decimal, Decimal, int]]]:
    """GET /v2/orders?status=open of every account, as book levels (best first)."""
    levels: dict[str, dict[Decimal, tuple[Decimal, int]]] = {"bids": {}, "asks": {}}
    for account in accounts:
        for o in _open_orders(run, account):
            if o.symbol != symbol or o.limit_price is None:
                continue
            side = "bids" if o.side == OrderSide.BUY else "asks"
            price = Decimal(o.limit_price)
            qty, n = levels[side].get(price, (Decimal(0), 0))
            levels[side][price] = (qty + Decimal(o.qty) - Decimal(o.filled_qty), n + 1)
    return {
        side: [(p, q, n) for p, (q, n) in sorted(lv.items(), reverse=side == "bids")]
        for side, lv in levels.items()
    }


def _last_close(run: Run, symbol: str) -> Decimal:
    r = run.http.get(run.url("streamer", f"/v1/latest/{symbol}"))
    assert r.status_code == 200, r.text
    return Decimal(r.json()["c"])


async def _exec_fills(nats_url: str, accounts: set[UUID]) -> list[ExecReport]:
    """Every fill report of EX_EXEC for `accounts` (an ordered consumer from the stream's start)."""
    nc = await connect_nats(nats_url, "e2e-audit")
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.STREAM_EX_EXEC)
        last = info.state.last_seq
        out: list[ExecReport] = []
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            report = codec.decode(msg.data, ExecReport)
            if report.exec is ExecType.FILL and report.account_id in accounts:
                out.append(report)
            if msg.metadata.sequence.stream >= last:
                done.set()

        sub = await js.subscribe(subjects.EX_EXEC_ALL, cb=on_msg, ordered_consumer=True)
        if last:
            await asyncio.wait_for(done.wait(), 30)
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def _containers(strategy_id: str) -> list[int]:
    """Pids of the strategy container processes of one deployment (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if (
            b"papertrade_strategy_runner.container" in cmdline
            and f"STRATEGY_ID={strategy_id}".encode() in environ
        ):
            found.append(int(entry.name))
    return found


def _snapshot_seq(run: Run) -> int:
    with redis.Redis.from_url(_endpoints(run).redis_url) as r:
        raw = r.get(SNAPSHOT_KEY)
    return int(json.loads(raw)["stream_seq"]) if raw else 0


def _endpoints(run: Run) -> Endpoints:
    assert run.stack.endpoints is not None
    return run.stack.endpoints


def _sql(run: Run, query: str, *args: Any) -> list[tuple[Any, ...]]:
    url = _endpoints(run).database_url.replace("+psycopg", "")
    with psycopg.connect(url) as conn:
        return list(conn.execute(query, args).fetchall())


def _wait_status(client: Any, order_id: Any, status: OrderStatus, timeout: float = 30.0) -> Any:
    return _wait(
        lambda: (o := client.get_order_by_id(order_id)).status == status and o,
        f"order {order_id} {status.value}",
        timeout=timeout,
    )


def _wait(check: Callable[[], Any], what: str, timeout: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, APIError, OSError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not reached in {timeout:g}s (last: {last!r})")


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except APIError:
        return None
