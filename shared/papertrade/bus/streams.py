"""The JetStream streams of the stack, defined once; `ensure_streams` creates or updates them."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from papertrade.bus import subjects

#: Bars: a bounded history per subject so a strategy starting late can warm up.
MD_STREAM = StreamConfig(
    name=subjects.STREAM_MD,
    subjects=[subjects.MD_ALL],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    max_msgs_per_subject=5_000,
    max_age=7 * 24 * 3600,
    discard=DiscardPolicy.OLD,
    duplicate_window=120,
)

#: Commands to the books: the orderbook rebuilds its books by replaying this stream.
EX_CMD_STREAM = StreamConfig(
    name=subjects.STREAM_EX_CMD,
    subjects=[subjects.EX_CMD_ALL],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    duplicate_window=120,
)

#: Execution reports to the broker: at-least-once, deduplicated by message id.
EX_EXEC_STREAM = StreamConfig(
    name=subjects.STREAM_EX_EXEC,
    subjects=[subjects.EX_EXEC_ALL],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    duplicate_window=120,
)

ALL_STREAMS = (MD_STREAM, EX_CMD_STREAM, EX_EXEC_STREAM)


async def ensure_streams(js: JetStreamContext, streams: tuple[StreamConfig, ...] = ALL_STREAMS) -> None:
    """Create each stream, or update it to this definition if it exists."""
    for config in streams:
        try:
            await js.stream_info(config.name)  # type: ignore[arg-type]
        except NotFoundError:
            await js.add_stream(config)
            continue
        try:
            await js.update_stream(config)
        except BadRequestError:
            # A field that cannot change on a live stream (e.g. storage): keep the existing stream.
            pass


def ack_refusal(headers: Mapping[str, str] | None, data: bytes) -> str | None:
    """Why JetStream did not store a published message, read from its ack; None: stored. A status
    header is the server's (503: no stream takes the subject), an `error` object the stream's."""
    if headers and (status := headers.get("Status")):
        return "no stream takes the subject (status 503)" if status == "503" else f"status {status}"
    if b'"error"' not in data:  # the usual ack: decoded only when it may hold an error
        return None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return f"unreadable ack: {data[:100]!r}"
    error = doc.get("error") if isinstance(doc, dict) else None
    if error is None:
        return None
    if isinstance(error, dict):
        return f"{error.get('description', 'error')} (code {error.get('err_code', error.get('code'))})"
    return str(error)


def stored_at(msg: Msg) -> float | None:
    """When JetStream stored a delivered message (unix seconds, the server's clock: nats-py reads it
    from the delivery's reply subject); None if `msg` is not a JetStream delivery."""
    try:
        return msg.metadata.timestamp.timestamp()
    except Exception:  # no reply, or not a `$JS.ACK` subject nats-py can read
        return None


async def exec_consumer(js: JetStreamContext, durable: str) -> JetStreamContext.PullSubscription:
    """A durable pull consumer of every execution report (`ex.exec.>`), acked explicitly.

    Each consumer of the exec stream (the broker's ledger, risk's state) names its own `durable`, so
    each sees every report; replicas of one service share theirs. Ensures the streams first.
    """
    await ensure_streams(js)
    return await js.pull_subscribe(
        subjects.EX_EXEC_ALL,
        durable=durable,
        stream=subjects.STREAM_EX_EXEC,
        config=exec_consumer_config(durable),
    )


def exec_consumer_config(durable: str, start_seq: int | None = None) -> ConsumerConfig:
    """The settings of an exec-stream consumer (`exec_consumer`): from the first report, or from
    stream sequence `start_seq` on (a benchmark or test that must not see earlier runs' reports)."""
    return ConsumerConfig(
        durable_name=durable,
        filter_subject=subjects.EX_EXEC_ALL,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_wait=30,
        max_ack_pending=20_000,
    )
