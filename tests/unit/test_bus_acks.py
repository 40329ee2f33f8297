"""`ack_refusal` on the answers a real NATS server gives to JetStream publishes: stored, a duplicate
(stored earlier), no stream for the subject, and a stream's own error; `stored_at` on a delivery."""

from __future__ import annotations

import time
import uuid

import nats
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, StreamConfig

from papertrade.bus.streams import ack_refusal, stored_at
from papertrade.stack.infra import Endpoints


async def test_ack_refusal_reads_the_servers_answers(infra: Endpoints) -> None:
    nc = await nats.connect(infra.nats_url)
    js = nc.jetstream()
    name = f"ACKS_{uuid.uuid4().hex[:8].upper()}"
    subject = f"acktest.{name.lower()}"
    await js.add_stream(
        StreamConfig(
            name=name, subjects=[subject], max_msgs=1, discard=DiscardPolicy.NEW, duplicate_window=60
        )
    )
    try:
        stored = await nc.request(subject, b"one", timeout=5, headers={"Nats-Msg-Id": "a"})
        assert ack_refusal(stored.headers, stored.data) is None
        again = await nc.request(subject, b"one", timeout=5, headers={"Nats-Msg-Id": "a"})
        assert b'"duplicate"' in again.data and ack_refusal(again.headers, again.data) is None
        full = await nc.request(subject, b"two", timeout=5, headers={"Nats-Msg-Id": "b"})
        why = ack_refusal(full.headers, full.data)
        assert why is not None and "maximum messages exceeded" in why, (why, full.data)
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)  # the way the broker reads its commands' acks
        await nc.publish(f"acktest.none.{name.lower()}", b"x", reply=inbox)
        nowhere = await sub.next_msg(timeout=5)
        assert ack_refusal(nowhere.headers, nowhere.data) == "no stream takes the subject (status 503)"
    finally:
        await js.delete_stream(name)
        await nc.close()


def test_ack_refusal_without_a_server() -> None:
    assert ack_refusal(None, b'{"stream":"EX_CMD","seq":7}') is None
    assert ack_refusal({}, b'{"stream":"error","seq":7}') is None  # "error" only as a value
    assert ack_refusal({"Status": "408"}, b"") == "status 408"
    assert ack_refusal(None, b'{"error":{"code":500,"err_code":10077,"description":"boom"}}') == (
        "boom (code 10077)"
    )
    assert ack_refusal(None, b'{"error": not json') == "unreadable ack: b'{\"error\": not json'"


async def test_stored_at_reads_a_deliverys_storage_time(infra: Endpoints) -> None:
    """`stored_at` gives the time the server stored a delivered message (what the ledger's
    fill-to-commit histogram starts from), and None for anything that is not a JetStream delivery."""
    nc = await nats.connect(infra.nats_url)
    js = nc.jetstream()
    name = f"STORED_{uuid.uuid4().hex[:8].upper()}"
    subject = f"storedtest.{name.lower()}"
    await js.add_stream(StreamConfig(name=name, subjects=[subject]))
    try:
        before = time.time()
        await js.publish(subject, b"x")
        after = time.time()
        sub = await js.pull_subscribe(subject, stream=name)
        (msg,) = await sub.fetch(1, timeout=5)
        stored = stored_at(msg)
        assert stored is not None and before - 1 <= stored <= after + 1
        assert abs(stored - msg.metadata.timestamp.timestamp()) < 1e-5  # nats-py reads the same field
        assert stored_at(Msg(nc, subject="x")) is None  # no reply
        assert stored_at(Msg(nc, subject="x", reply="_INBOX.abc")) is None
        assert stored_at(Msg(nc, subject="x", reply="$JS.ACK.too.short")) is None
    finally:
        await js.delete_stream(name)
        await nc.close()
