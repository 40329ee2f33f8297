"""The orderbook service on real NATS JetStream and Redis: commands in, reports out, REST, liquidity,
and exact recovery after SIGKILL without duplicate execution reports."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from redis.asyncio import Redis

from papertrade import keys
from papertrade.accounts import LIQUIDITY_ACCOUNT_ID
from papertrade.book import BookCommand, OpenBookCmd, OrderBook, QuoteCmd
from papertrade.bus import subjects
from papertrade.bus.streams import ensure_streams
from papertrade.codec import decode, encode
from papertrade.enums import ExecType, Interval, OrderType, Side, TimeInForce
from papertrade.messages import CancelCmd, ExecReport, NewOrderCmd, Quote, ReplaceCmd, TradePrint
from papertrade.models import Bar
from papertrade.stack.infra import Endpoints
from papertrade_orderbook.exchange import liquidity_key
from tests.conftest import ADMIN_TOKEN
from tests.orderbook.helpers import T0, A, B

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
NO_LIQUIDITY = {"ORDERBOOK_LIQUIDITY_ENABLED": "false", "ORDERBOOK_WATCHLIST_POLL_SECONDS": "0.5"}


def _symbol() -> str:
    return "Z" + uuid.uuid4().hex[:7].upper()


@pytest.fixture
async def bus(infra: Endpoints) -> AsyncIterator[tuple[NATS, JetStreamContext]]:
    nc = await nats.connect(infra.nats_url, name="orderbook-test")
    js = nc.jetstream()
    await ensure_streams(js)
    yield nc, js
    await nc.close()


async def _send(js: JetStreamContext, cmd: BookCommand) -> None:
    await js.publish(subjects.ex_cmd(cmd.symbol), encode(cmd))


async def _reports(js: JetStreamContext, symbol: str, at_least: int, timeout: float = 20) -> list[ExecReport]:
    """Every report in EX_EXEC for `symbol` (waits until there are `at_least`, then until quiet)."""
    sub = await js.subscribe(subjects.ex_exec(symbol), ordered_consumer=True)
    out: list[ExecReport] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
                out.append(decode(msg.data, ExecReport))
            except nats.errors.TimeoutError:
                if len(out) >= at_least or time.monotonic() > deadline:
                    break
    finally:
        await sub.unsubscribe()
    return out


async def _last_command(js: JetStreamContext, symbol: str) -> BookCommand:
    """The latest command on `ex.cmd.<symbol>` in the EX_CMD stream."""
    msg = await js.get_last_msg(subjects.STREAM_EX_CMD, subjects.ex_cmd(symbol))
    assert msg.data is not None
    return decode(msg.data, BookCommand)  # type: ignore[arg-type]


async def _until(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _new(n: int, symbol: str, side: str, qty: str, price: str | None = None, **kw: Any) -> NewOrderCmd:
    kind = kw.pop("type", None) or ("limit" if price is not None else "market")
    return NewOrderCmd(
        order_id=uuid.UUID(int=n),
        account_id=kw.pop("account", A),
        symbol=symbol,
        side=Side(side),
        type=OrderType(kind),
        time_in_force=TimeInForce(kw.pop("tif", "gtc")),
        t=T0,
        qty=Decimal(qty),
        limit_price=None if price is None else Decimal(price),
        **kw,
    )


async def test_commands_reports_prints_and_rest(start_services: Any, bus: Any, infra: Endpoints) -> None:
    nc, js = bus
    _, url = start_services("orderbook", **NO_LIQUIDITY)
    sym = _symbol()
    prints: list[TradePrint] = []

    async def on_print(msg: Any) -> None:
        prints.append(decode(msg.data, TradePrint))

    await nc.subscribe(subjects.ex_trade(sym), cb=on_print)
    quotes: list[Quote] = []

    async def on_quote(msg: Any) -> None:
        quotes.append(decode(msg.data, Quote))

    await nc.subscribe(subjects.ex_quote(sym), cb=on_quote)
    async with httpx.AsyncClient(base_url=url) as http:
        await _send(js, OpenBookCmd(symbol=sym, t=T0))

        async def has_book() -> bool:
            return sym in (await http.get("/v1/symbols")).json()

        await _until(has_book, "the book")
        await _send(js, _new(1, sym, "sell", "10", "100.00"))
        await _send(js, _new(2, sym, "sell", "5", "100.01"))
        await _send(js, _new(3, sym, "buy", "12", account=B))
        reps = await _reports(js, sym, 7)
        assert [r.exec.value for r in reps] == [
            "accepted",
            "accepted",
            "accepted",
            "fill",
            "fill",
            "fill",
            "fill",
        ]
        assert [r.seq for r in reps] == list(range(1, 8))
        assert [(str(r.price), str(r.qty)) for r in reps if r.liquidity and r.liquidity.value == "taker"] == [
            ("100.00", "10"),
            ("100.01", "2"),
        ]
        book = (await http.get(f"/v1/books/{sym}", params={"depth": 5})).json()
        assert book["symbol"] == sym and book["bids"] == []
        assert book["asks"] == [{"price": "100.01", "qty": "3", "orders": 1}]
        assert book["last_price"] == "100.01" and book["timestamp"].startswith("2024-01-02T15:00:00")

        await _until(lambda: _ready(len(prints) == 2), "two prints")
        assert [(str(p.price), str(p.qty), p.aggressor_side.value) for p in prints] == [
            ("100.00", "10", "buy"),
            ("100.01", "2", "buy"),
        ]
        # top of book on ex.quote after each change: the last one shows the remaining ask and last
        await _until(lambda: _ready(bool(quotes) and quotes[-1].last == Decimal("100.01")), "quotes")
        assert quotes[-1].ask == Decimal("100.01") and quotes[-1].ask_size == 3 and quotes[-1].bid is None
        redis = Redis.from_url(infra.redis_url)
        try:
            last = orjson.loads(await redis.get(keys.last_trade(sym)))
        finally:
            await redis.aclose()
        assert last["price"] == "100.01"

        # bad commands: off-tick, unknown id, unknown symbol -> rejected reports, book untouched
        await _send(js, _new(4, sym, "buy", "1", "100.001"))
        await _send(js, CancelCmd(order_id=uuid.UUID(int=99), account_id=A, symbol=sym, t=T0))
        nobook = _symbol()
        await _send(js, _new(5, nobook, "buy", "1", "1.00"))
        reps = await _reports(js, sym, 9)
        assert [r.exec.value for r in reps[7:]] == ["rejected", "rejected"]
        assert "tick" in (reps[7].reason or "") and reps[8].command == "cancel"
        other = await _reports(js, nobook, 1)
        assert other[0].exec is ExecType.REJECTED and "no book" in (other[0].reason or "")
        assert (await http.get(f"/v1/books/{sym}")).json()["asks"] == book["asks"]

        # malformed commands: garbage is dropped (logged); one that names its order is rejected
        await js.publish(subjects.ex_cmd(sym), b"not json at all")
        bad = {
            "cmd": "new",
            "order_id": str(uuid.UUID(int=6)),
            "account_id": str(A),
            "symbol": sym,
            "side": "buy",
            "type": "limit",
            "time_in_force": "gtc",
            "t": "2024-01-02T15:00:00Z",
            "qty": "ten",
            "limit_price": "99.00",
        }
        await js.publish(subjects.ex_cmd(sym), orjson.dumps(bad))
        await _send(js, _new(7, sym, "buy", "1", "99.00"))
        reps = await _reports(js, sym, 11)
        assert [r.exec.value for r in reps[9:]] == ["rejected", "accepted"]
        assert reps[9].order_id == uuid.UUID(int=6) and "malformed" in (reps[9].reason or "")
        assert [r.seq for r in reps] == list(range(1, 12))

        # REST errors and admin
        r = await http.get(f"/v1/books/{nobook}")
        assert r.status_code == 404 and r.json()["code"] == 40410000
        assert (await http.get(f"/v1/books/{sym}", params={"depth": 0})).status_code == 422
        assert (await http.get("/v1/books/bad symbol!")).status_code == 422
        r = await http.put(f"/v1/books/{sym}/liquidity", json={"enabled": True})
        assert r.status_code == 401 and "code" in r.json()
        r = await http.put(f"/v1/books/{sym}/liquidity", json={"enabled": "maybe"}, headers=ADMIN)
        assert r.status_code == 422
        r = await http.put(f"/v1/books/{sym}/liquidity", json={"enabled": False, "levels": 3}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["levels"] == 3
        assert (await http.get(f"/v1/books/{sym}/liquidity")).json()["enabled"] is False
        redis = Redis.from_url(infra.redis_url)
        try:  # persisted: a restarted orderbook keeps the switch
            kept = orjson.loads(await redis.get(liquidity_key(sym)))
        finally:
            await redis.aclose()
        assert kept["enabled"] is False and kept["levels"] == 3
        assert (await http.get(f"/v1/books/{sym}/orders")).status_code == 401
        orders = (await http.get(f"/v1/books/{sym}/orders", headers=ADMIN)).json()["orders"]
        assert [o["id"] for o in orders] == [str(uuid.UUID(int=7)), str(uuid.UUID(int=2))]  # bids, then asks


async def test_watchlist_creates_books(start_services: Any, infra: Endpoints) -> None:
    sym = _symbol()
    redis = Redis.from_url(infra.redis_url)
    old = await redis.get(keys.WATCHLIST)
    try:
        current = orjson.loads(old) if old else {"symbols": [], "intervals": ["1m"]}
        await redis.set(keys.WATCHLIST, orjson.dumps({**current, "symbols": [*current["symbols"], sym]}))
        _, url = start_services("orderbook", **NO_LIQUIDITY)
        async with httpx.AsyncClient(base_url=url) as http:

            async def listed() -> bool:
                return sym in (await http.get("/v1/symbols")).json()

            await _until(listed, "the watchlist symbol's book")
    finally:
        if old is not None:
            await redis.set(keys.WATCHLIST, old)
        await redis.aclose()


async def test_a_new_book_is_quoted_at_once_from_the_latest_bar_in_redis(
    start_services: Any, infra: Endpoints
) -> None:
    """A book the watchlist opens gets the agent's ladder around the streamer's latest 1m bar right away,
    not a minute later at the next bar (what a newcomer's first order after `make up` meets)."""
    sym = _symbol()
    bar = Bar(
        symbol=sym,
        interval=Interval.M1,
        t=T0,
        o=Decimal("100"),
        h=Decimal("100.5"),
        l=Decimal("99.5"),
        c=Decimal("100.00"),
        v=Decimal(1000),
    )
    redis = Redis.from_url(infra.redis_url)
    old = await redis.get(keys.WATCHLIST)
    try:
        await redis.set(keys.latest_bar(Interval.M1, sym), encode(bar))
        current = orjson.loads(old) if old else {"symbols": [], "intervals": ["1m"]}
        await redis.set(keys.WATCHLIST, orjson.dumps({**current, "symbols": [*current["symbols"], sym]}))
        env = {
            "ORDERBOOK_LIQUIDITY_ENABLED": "true",
            "ORDERBOOK_LIQUIDITY_LEVELS": "2",
            "ORDERBOOK_LIQUIDITY_SPREAD_BPS": "10",
            "ORDERBOOK_LIQUIDITY_STEP_BPS": "5",
            "ORDERBOOK_WATCHLIST_POLL_SECONDS": "0.5",
        }
        _, url = start_services("orderbook", **env)
        async with httpx.AsyncClient(base_url=url) as http:

            async def quoted() -> dict[str, Any] | None:
                r = await http.get(f"/v1/books/{sym}")
                body: dict[str, Any] = r.json() if r.status_code == 200 else {}
                return body if body.get("bids") and body.get("asks") else None

            book = await _until(quoted, "the ladder around the latest bar")  # no bar was published
            assert [b["price"] for b in book["bids"]] == ["99.95", "99.90"]
            assert [a["price"] for a in book["asks"]] == ["100.05", "100.10"]
    finally:
        if old is not None:
            await redis.set(keys.WATCHLIST, old)
        await redis.delete(keys.latest_bar(Interval.M1, sym))
        await redis.aclose()


async def test_liquidity_agent_quotes_around_the_bar_and_switches_off(
    start_services: Any, bus: Any, infra: Endpoints
) -> None:
    nc, js = bus
    env = {
        "ORDERBOOK_LIQUIDITY_ENABLED": "true",
        "ORDERBOOK_LIQUIDITY_LEVELS": "3",
        "ORDERBOOK_LIQUIDITY_SIZE": "50",
        "ORDERBOOK_LIQUIDITY_SPREAD_BPS": "10",
        "ORDERBOOK_LIQUIDITY_STEP_BPS": "5",
    }
    _, url = start_services("orderbook", **env)
    sym = _symbol()
    bar = Bar(
        symbol=sym,
        interval=Interval.M1,
        t=T0,
        o=Decimal("100"),
        h=Decimal("100.5"),
        l=Decimal("99.5"),
        c=Decimal("100.00"),
        v=Decimal(1000),
    )
    await nc.publish(subjects.md_bar(Interval.M1, sym), encode(bar))
    async with httpx.AsyncClient(base_url=url) as http:

        async def quoted() -> dict[str, Any] | None:
            r = await http.get(f"/v1/books/{sym}")
            if r.status_code != 200:
                return None
            body: dict[str, Any] = r.json()
            return body if len(body["bids"]) == 3 and len(body["asks"]) == 3 else None

        book = await _until(quoted, "the liquidity ladder")
        assert [b["price"] for b in book["bids"]] == ["99.95", "99.90", "99.85"]
        assert [a["price"] for a in book["asks"]] == ["100.05", "100.10", "100.15"]
        assert all(level["qty"] == "50" for level in book["bids"] + book["asks"])
        # a real order fills against the synthetic ladder at its prices
        await _send(js, _new(1, sym, "buy", "60", account=A))
        reps = await _reports(js, sym, 1)
        fills = [r for r in reps if r.order_id == uuid.UUID(int=1) and r.exec is ExecType.FILL]
        assert [(str(r.price), str(r.qty)) for r in fills] == [("100.05", "50"), ("100.10", "10")]
        assert {r.account_id for r in reps if r.liquidity and r.liquidity.value == "maker"} == {
            LIQUIDITY_ACCOUNT_ID
        }
        # the next bar re-quotes the consumed rung
        await nc.publish(subjects.md_bar(Interval.M1, sym), encode(_next(bar)))

        async def refilled() -> bool:
            body = (await http.get(f"/v1/books/{sym}")).json()
            # the emptied best rung is placed again; 100.10 keeps 40 (>= half a rung: not re-placed)
            return [(a["price"], a["qty"]) for a in body["asks"]] == [
                ("100.05", "50"),
                ("100.10", "40"),
                ("100.15", "50"),
            ]

        await _until(refilled, "the re-quoted ladder")
        # ... with one command: an order never lands between a re-quote's cancels and its places
        quote = await _last_command(js, sym)
        assert isinstance(quote, QuoteCmd) and quote.account_id == LIQUIDITY_ACCOUNT_ID
        assert quote.cancels == () and [(str(o.limit_price), str(o.qty)) for o in quote.places] == [
            ("100.05", "50")
        ]
        r = await http.put(f"/v1/books/{sym}/liquidity", json={"enabled": False}, headers=ADMIN)
        assert r.status_code == 200

        async def empty() -> bool:
            body = (await http.get(f"/v1/books/{sym}")).json()
            return body["bids"] == [] and body["asks"] == []

        await _until(empty, "the ladder withdrawn")
        withdrawal = await _last_command(js, sym)
        assert isinstance(withdrawal, QuoteCmd) and len(withdrawal.cancels) == 6 and withdrawal.places == ()
        await nc.publish(subjects.md_bar(Interval.M1, sym), encode(_next(_next(bar))))
        await asyncio.sleep(0.5)
        assert (await http.get(f"/v1/books/{sym}")).json()["asks"] == []

        # switching on a symbol that has had no bar here quotes around the streamer's latest bar
        other = _symbol()
        await _send(js, OpenBookCmd(symbol=other, t=T0))
        latest = Bar(
            symbol=other,
            interval=Interval.M1,
            t=T0,
            o=Decimal(50),
            h=Decimal(50),
            l=Decimal(50),
            c=Decimal("50.00"),
            v=Decimal(1),
        )
        redis = Redis.from_url(infra.redis_url)
        try:
            await redis.set(keys.latest_bar(Interval.M1, other), encode(latest))
        finally:
            await redis.aclose()

        async def opened() -> bool:
            return other in (await http.get("/v1/symbols")).json()

        await _until(opened, "the second book")
        r = await http.put(f"/v1/books/{other}/liquidity", json={"enabled": True}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["enabled"] is True

        async def laddered() -> bool:
            body = (await http.get(f"/v1/books/{other}")).json()
            return (
                bool(body["bids"])
                and body["bids"][0]["price"] == "49.97"
                and body["asks"][0]["price"] == "50.03"
            )

        await _until(laddered, "the ladder around the latest bar")


async def test_day_orders_expire_at_the_close_by_bar_time(start_services: Any, bus: Any) -> None:
    nc, js = bus
    _, url = start_services("orderbook", **NO_LIQUIDITY)
    sym = _symbol()
    await _send(js, OpenBookCmd(symbol=sym, t=T0))
    await _send(js, _new(1, sym, "buy", "5", "99.00", tif="day"))
    await _send(js, _new(2, sym, "buy", "5", "98.00", tif="gtc"))
    # 2024-01-02 closes at 21:00 UTC; the 20:59 bar ends at the close
    for minute in (20 * 60 + 58, 20 * 60 + 59):
        t = T0.replace(hour=0, minute=0) + timedelta(minutes=minute)
        bar = Bar(
            symbol=sym,
            interval=Interval.M1,
            t=t,
            o=Decimal(99),
            h=Decimal(99),
            l=Decimal(99),
            c=Decimal(99),
            v=Decimal(1),
        )
        await nc.publish(subjects.md_bar(Interval.M1, sym), encode(bar))
        await asyncio.sleep(0.3)
    reps = await _reports(js, sym, 3)
    expired = [r for r in reps if r.exec is ExecType.EXPIRED]
    assert [r.order_id for r in expired] == [uuid.UUID(int=1)]
    async with httpx.AsyncClient(base_url=url) as http:
        assert [b["price"] for b in (await http.get(f"/v1/books/{sym}")).json()["bids"]] == ["98.00"]


async def test_recovery_after_sigkill_is_exact_and_without_duplicates(start_services: Any, bus: Any) -> None:
    _, js = bus
    env = {**NO_LIQUIDITY, "ORDERBOOK_SNAPSHOT_EVERY": "60"}  # the restart loads a snapshot + the tail
    proc, url = start_services("orderbook", **env)
    sym = _symbol()
    commands = _workload(sym, 400, seed=7)
    replica = OrderBook(sym)
    expected: list[ExecReport] = []
    for cmd in commands:
        expected += replica.apply(cmd)

    await _send(js, OpenBookCmd(symbol=sym, t=T0))
    for cmd in commands[:200]:
        await _send(js, cmd)
    async with httpx.AsyncClient(base_url=url) as http:

        async def caught_up(n: int, client: httpx.AsyncClient) -> bool:
            r = await client.get(f"/v1/books/{sym}/orders", headers=ADMIN)
            return r.status_code == 200 and r.json()["seq"] >= n

        half = OrderBook(sym)
        n_half = sum(len(half.apply(c)) for c in commands[:200])
        await _until(lambda: caught_up(n_half, http), "the first half")
    # the second half goes out while the service is busy, and it dies mid-stream
    for cmd in commands[200:]:
        await js.publish(subjects.ex_cmd(sym), encode(cmd))
    proc.kill()
    assert not proc.alive()

    proc2, url2 = start_services("orderbook", **env)
    async with httpx.AsyncClient(base_url=url2) as http:
        await _until(lambda: caught_up(len(expected), http), "the replay", timeout=60)
        body = (await http.get(f"/v1/books/{sym}/orders", headers=ADMIN)).json()
        want = [_jsonish(o) for o in replica.snapshot()]
        assert body["orders"] == want
        assert any(o["state"] == "dormant" for o in want)

    published = await _reports(js, sym, len(expected))
    assert [r.seq for r in published] == list(range(1, len(expected) + 1)), "a duplicate or a gap"
    assert [encode(r) for r in published] == [encode(r) for r in expected]
    assert "books restored from snapshot" in proc2.log_path.read_text()

    # a clean stop snapshots at the last command; a start from a snapshot alone is just as exact
    proc2.stop()
    _, url3 = start_services("orderbook", **NO_LIQUIDITY)
    async with httpx.AsyncClient(base_url=url3) as http:
        await _until(lambda: caught_up(len(expected), http), "the restart from the snapshot")
        body = (await http.get(f"/v1/books/{sym}/orders", headers=ADMIN)).json()
        assert body["orders"] == [_jsonish(o) for o in replica.snapshot()]
    assert len(await _reports(js, sym, len(expected))) == len(expected)


def _workload(sym: str, n: int, seed: int) -> list[BookCommand]:
    rng = random.Random(seed)
    out: list[BookCommand] = []
    live: list[int] = []
    for i in range(1, n + 1):
        r = rng.random()
        side = rng.choice(["buy", "sell"])
        qty = str(rng.randint(1, 50))
        price = f"{100 + rng.randint(-20, 20) / 100:.2f}"
        acct = rng.choice([A, B])
        if r < 0.55:
            out.append(_new(i, sym, side, qty, price, account=acct, tif=rng.choice(["gtc", "day", "ioc"])))
            live.append(i)
        elif r < 0.65:
            out.append(_new(i, sym, side, qty, account=acct))
        elif r < 0.75:
            # some stops near the market (they fire), some far away (they stay dormant)
            far = rng.random() < 0.5
            off = rng.randint(50, 90) if far else rng.randint(-20, 20)
            stop = f"{100 + (off if side == 'buy' else -off) / 100:.2f}"
            out.append(_new(i, sym, side, qty, type="stop", stop_price=Decimal(stop), account=acct))
            live.append(i)
        elif r < 0.9 and live:
            victim = live.pop(rng.randrange(len(live)))
            out.append(CancelCmd(order_id=uuid.UUID(int=victim), account_id=acct, symbol=sym, t=T0))
        elif live:
            victim = live.pop(rng.randrange(len(live)))
            out.append(
                ReplaceCmd(
                    order_id=uuid.UUID(int=victim),
                    new_order_id=uuid.UUID(int=i),
                    account_id=acct,
                    symbol=sym,
                    t=T0,
                    qty=Decimal(rng.randint(1, 60)),
                )
            )
            live.append(i)
    return out


def _jsonish(o: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if v is not None and not isinstance(v, bool | int) else v) for k, v in o.items()}


def _next(bar: Bar) -> Bar:
    return Bar(
        symbol=bar.symbol,
        interval=bar.interval,
        t=bar.t + timedelta(minutes=1),
        o=bar.c,
        h=bar.h,
        l=bar.l,
        c=bar.c,
        v=bar.v,
    )


async def _ready(value: bool) -> bool:
    return value
