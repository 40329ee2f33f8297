"""A broker killed between an order's commit and its command: the next broker's start-up recovery.

The orders are written straight into Postgres as a killed broker would have left them (no risk and no
book run here); one of them has its command in EX_CMD, as if the broker died after publishing it.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import psycopg
import pytest
from sqlalchemy.engine import make_url

from papertrade import codec
from papertrade.bus import subjects
from papertrade.bus.streams import EX_CMD_STREAM, ensure_streams
from papertrade.enums import OrderType, Side, TimeInForce
from papertrade.messages import CancelCmd, NewOrderCmd
from papertrade.stack.infra import Endpoints, create_database
from papertrade.stack.launch import launch
from papertrade_broker import recovery
from papertrade_broker.recovery import REASON
from tests.broker.conftest import key_headers, wait_for
from tests.conftest import ADMIN_TOKEN

SYMBOL = "RCVRY"


def test_orders_left_between_commit_and_command_are_recovered_at_start(
    infra: Endpoints, tmp_path: Path
) -> None:
    db = create_database(infra.database_url, f"broker_{uuid.uuid4().hex[:10]}")
    env = {
        **infra.env(),
        "DATABASE_URL": db,
        "PAPERTRADE_ADMIN_TOKEN": ADMIN_TOKEN,
        "BROKER_LEDGER_DURABLE": f"broker-test-{uuid.uuid4().hex[:8]}",
        "BROKER_RECOVERY_GRACE": "0.2",
    }
    recovering = {**env, "BROKER_RECOVERY_GRACE": "8"}  # longer than the start-up below
    proc, url = launch("broker", env, tmp_path / "first")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            r = admin.post("/admin/accounts", json={"name": "recovery", "cash": "10000"})
            assert r.status_code == 201, r.text
            created = r.json()
            account = uuid.UUID(created["id"])
            keys = key_headers(created)
    finally:
        proc.stop()

    earlier = datetime.now(UTC) - timedelta(seconds=30)
    lost = _order(account, "pending_new", earlier)  # committed; the broker died before publishing
    routed = _order(account, "pending_new", earlier)  # committed and published; died before the answer
    canceling = _order(account, "pending_cancel", earlier)  # marked; the cancel never went out
    replaced = _order(account, "new", earlier)
    replacement = _order(account, "pending_new", earlier, replaces=replaced["id"])
    replaced["replaced_by"] = replacement["id"]
    with _connect(db) as conn:
        for row in (lost, routed, canceling, replaced, replacement):
            cols = ", ".join(row)
            conn.execute(
                f"INSERT INTO orders ({cols}) VALUES ({', '.join(['%s'] * len(row))})", list(row.values())
            )
        held = conn.execute("SELECT sum(reserved) FROM orders WHERE account_id = %s", [account]).fetchone()
        assert held is not None and held[0] == Decimal("250")
    asyncio.run(_publish_new(infra.nats_url, routed, account))
    cancels = _Listener(infra.nats_url, subjects.ex_cmd(SYMBOL))
    events = _Listener(infra.nats_url, subjects.broker_event(account))

    proc, url = launch("broker", recovering, tmp_path / "second")
    try:
        with httpx.Client(base_url=url, headers=keys) as client:
            # until recovery went through, an order from before the restart that may never have
            # reached the book cannot be canceled (its cancel would be refused there)
            r = client.delete(f"/v2/orders/{lost['id']}")
            assert r.status_code == 503, r.text
            assert "being recovered after a broker restart" in r.json()["message"]
        with _connect(db) as conn:

            def status(order: dict[str, Any]) -> tuple[str, str | None, Decimal]:
                row = conn.execute(
                    "SELECT status, reason, reserved FROM orders WHERE id = %s", [order["id"]]
                ).fetchone()
                assert row is not None
                return row[0], row[1], row[2]

            wait_for(lambda: status(lost)[0] == "rejected", 30, "the unrouted order rejected")
            assert status(lost) == ("rejected", REASON, Decimal(0))
            wait_for(lambda: status(replacement)[0] == "rejected", 30, "the unrouted replacement rejected")
            freed = conn.execute("SELECT replaced_by FROM orders WHERE id = %s", [replaced["id"]]).fetchone()
            assert freed == (None,)
            # its command is in the stream: the book and the ledger will move it, recovery does not
            assert status(routed)[0] == "pending_new"
            assert status(canceling)[0] == "pending_cancel"
            held = conn.execute(
                "SELECT sum(reserved) FROM orders WHERE account_id = %s", [account]
            ).fetchone()
            assert held is not None and held[0] == Decimal("150")  # routed + canceling + replaced
        ids = wait_for(lambda: cancels.msg_ids(), 30, "the cancel sent again")
        assert f"{canceling['id']}:cancel" in ids
        assert not any(str(o["id"]) in i for i in ids for o in (lost, routed, replacement))
        # the rejections reach the account's trade updates (no book report will come for them)
        updates = wait_for(lambda: len(events.bodies()) >= 2 and events.bodies(), 30, "two trade updates")
        rejected = {(u["event"], u["order"]["id"], u["order"]["status"]) for u in map(orjson.loads, updates)}
        assert rejected == {("rejected", str(o["id"]), "rejected") for o in (lost, replacement)}
        log = (tmp_path / "second" / "broker.log").read_text()
        assert "orders left pending by a stopped broker" in log
        with httpx.Client(base_url=url, headers=keys) as client:
            r = client.delete(f"/v2/orders/{lost['id']}")
            assert r.status_code == 422 and "status rejected" in r.json()["message"], r.text
    finally:
        proc.stop()
        cancels.stop()
        events.stop()


def test_the_stream_is_not_waited_on_when_nothing_was_stored_since(infra: Endpoints) -> None:
    async def scan() -> set[str]:
        nc = await nats.connect(infra.nats_url)
        try:
            js = nc.jetstream()
            await ensure_streams(js, (EX_CMD_STREAM,))
            stray = CancelCmd(
                order_id=uuid.uuid4(), account_id=uuid.uuid4(), symbol=SYMBOL, t=datetime.now(UTC)
            )
            await js.publish(
                subjects.ex_cmd(SYMBOL),
                codec.encode(stray),
                headers={"Nats-Msg-Id": f"{stray.order_id}:cancel"},
            )
            return await asyncio.wait_for(
                recovery.stored_msg_ids(js, datetime.now(UTC) + timedelta(hours=1), {"anything:new"}), 10
            )
        finally:
            await nc.close()

    assert asyncio.run(scan()) == set()


def test_a_failed_recovery_is_tried_again_until_it_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "RETRY_FIRST", 0.01)
    calls: list[int] = []

    async def attempt() -> recovery.Outcome:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("NATS is down")
        return recovery.Outcome([], [], [])

    async def main() -> None:
        await asyncio.wait_for(recovery.recover_in_background(0.0, attempt, asyncio.Event()), 10)

    asyncio.run(main())
    assert len(calls) == 3


def _order(
    account: uuid.UUID, status: str, at: datetime, replaces: uuid.UUID | None = None
) -> dict[str, Any]:
    oid = uuid.uuid4()
    return {
        "id": oid,
        "account_id": account,
        "client_order_id": str(oid),
        "symbol": SYMBOL,
        "side": "buy",
        "type": "limit",
        "time_in_force": "gtc",
        "qty": Decimal(1),
        "limit_price": Decimal(50),
        "status": status,
        "reserve_price": Decimal(50),
        "reserved": Decimal(50),
        "created_at": at,
        "updated_at": at,
        "submitted_at": at,
        "replaces": replaces,
    }


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True
    )


async def _publish_new(nats_url: str, order: dict[str, Any], account: uuid.UUID) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, (EX_CMD_STREAM,))
        cmd = NewOrderCmd(
            order_id=order["id"],
            account_id=account,
            symbol=SYMBOL,
            side=Side.BUY,
            type=OrderType.LIMIT,
            time_in_force=TimeInForce.GTC,
            qty=order["qty"],
            limit_price=order["limit_price"],
            t=order["created_at"],
        )
        await js.publish(
            subjects.ex_cmd(SYMBOL), codec.encode(cmd), headers={"Nats-Msg-Id": f"{order['id']}:new"}
        )
    finally:
        await nc.close()


class _Listener:
    """The messages published on one subject (their ids, their bodies), heard on a core NATS
    subscription in a thread."""

    def __init__(self, nats_url: str, subject: str) -> None:
        self._ids: list[str] = []
        self._bodies: list[bytes] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(nats_url, subject),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "listener not subscribed"

    def msg_ids(self) -> list[str]:
        return list(self._ids)

    def bodies(self) -> list[bytes]:
        return list(self._bodies)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _run(self, nats_url: str, subject: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await nats.connect(nats_url)

        async def on_msg(msg: Any) -> None:
            self._bodies.append(msg.data)
            if msg.headers and "Nats-Msg-Id" in msg.headers:
                self._ids.append(msg.headers["Nats-Msg-Id"])

        await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()
