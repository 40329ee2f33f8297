"""The exchange: every book of this orderbook, fed in stream order by the EX_CMD JetStream stream.

How it stays exact across a crash (SIGKILL included):

- The books are a pure function of the EX_CMD stream: at start an ordered consumer replays the stream
  (from the first message, or from just after the Redis snapshot of every book, written every
  `ORDERBOOK_SNAPSHOT_EVERY` commands and at a clean stop), and keeps consuming live commands after.
  Everything that changes a book is a command in that stream: the broker's new / cancel / replace, `OpenBookCmd` (a symbol
  gets a book when the watchlist names it or a bar arrives for it), `ExpireDayCmd` (the session
  closed, by the bars' simulation time) and the synthetic liquidity agent's own orders and cancels.
- Reports are numbered per symbol (`seq`). Before publishing a symbol's first report, the exchange
  reads the last report already in EX_EXEC for that symbol (`L`). Every report carries
  `Nats-Msg-Id: <symbol>:<seq>`, so JetStream drops a duplicate within its window. Replayed reports
  at or below `L - _ACK_BATCH` are stored for certain and not published again; the last
  `_ACK_BATCH` below `L` are, because one of them may be missing: a report refused while later ones
  of its batch were stored, the process killed before its re-publish (see below). Past the
  dedupe window such a repeat is stored twice, which the consumers' idempotence absorbs.
- Reports are published pipelined (in stream order on one connection, each with its own reply subject
  for its JetStream ack) and their acks awaited together once the consumer has no more commands
  queued, or every `_ACK_BATCH` reports (`_flush`). (Not nats-py's `publish_async`: its future,
  semaphore and JSON-decoded `PubAck` per report cost more than the matching.) A report whose ack failed is published again, then every report after it, one by one
  in order (ids make the repeats harmless). A snapshot is only written after the flush, so it never
  covers a command whose reports are not stored.
- Public prints, quotes and the Redis last trade are only published for live commands; the quote and
  the last trade once per flush for each book that changed (the latest state, not every step).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import orjson
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from papertrade import calendar, keys
from papertrade.accounts import LIQUIDITY_ACCOUNT_ID
from papertrade.book import BookCommand, ExpireDayCmd, OpenBookCmd, OrderBook, QuoteCmd
from papertrade.book.liquidity import LiquidityConfig, ladder, reconcile
from papertrade.bus import subjects
from papertrade.bus.streams import EX_CMD_STREAM, EX_EXEC_STREAM, ack_refusal, ensure_streams
from papertrade.codec import decode, encode
from papertrade.enums import ExecType, Interval, OrderType, SelfTradePrevention, Side, TimeInForce
from papertrade.errors import ValidationError
from papertrade.instruments import instrument
from papertrade.messages import ExecReport, NewOrderCmd
from papertrade.models import Bar
from papertrade.money import fmt
from papertrade.service import ServiceContext
from papertrade.symbols import normalize_symbol, symbol_from_token
from papertrade.timeutil import iso
from papertrade_orderbook.settings import OrderbookSettings

#: await the acks of the pipelined reports at least every this many reports
_ACK_BATCH = 512
#: seconds to wait for the acks of one flush before publishing the unacknowledged reports again
_ACK_TIMEOUT = 5.0
#: How long a newly opened book waits for the streamer's latest bar in Redis to quote it at once.
_FIRST_QUOTE_WAIT = 60.0
_RETRYABLE = (NatsTimeoutError, NoRespondersError, ConnectionClosedError, TimeoutError)

LIQUIDITY_KEY_PREFIX = "pt:ob:liquidity:"
#: Redis key of the books' snapshot (owned by the orderbook): {"stream_seq", "stream_created", "books", ...}
SNAPSHOT_KEY = "pt:ob:snapshot"


def liquidity_key(symbol: str) -> str:
    """Redis key of a symbol's synthetic liquidity switch and overrides (owned by the orderbook)."""
    return f"{LIQUIDITY_KEY_PREFIX}{symbol}"


@dataclass(frozen=True)
class LiquidityState:
    enabled: bool
    config: LiquidityConfig

    def to_json(self, symbol: str) -> dict[str, Any]:
        c = self.config
        return {
            "symbol": symbol,
            "enabled": self.enabled,
            "spread_bps": fmt(c.spread_bps),
            "levels": c.levels,
            "size": fmt(c.size),
            "step_bps": fmt(c.step_bps),
            "size_step": fmt(c.size_step),
            "refresh_bars": c.refresh_bars,
        }


class Exchange:
    """Books, the command consumer, report publishing, DAY expiry and the liquidity agent."""

    def __init__(self, ctx: ServiceContext, settings: OrderbookSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.log = ctx.log
        self.books: dict[str, OrderBook] = {}
        self.ready = asyncio.Event()
        self.replay_until = 0
        self.processed_seq = 0
        self._orphan_seq: dict[str, int] = {}
        self._last_published: dict[str, int] = {}
        self._opening: set[str] = set()
        self._next_close: dict[str, datetime] = {}
        self._last_expiry: dict[str, datetime] = {}
        self._liquidity: dict[str, LiquidityState] = {}
        self._last_bar: dict[str, Bar] = {}
        self._bar_count: dict[str, int] = {}
        self._agent_inflight: dict[str, int] = {}
        #: one re-quote or withdrawal of the agent at a time per symbol (see withdraw)
        self._agent_locks: dict[str, asyncio.Lock] = {}
        self._tops: dict[str, Any] = {}
        self._js: JetStreamContext | None = None
        #: the client itself (not `ctx.links.nats`, which raises while it reconnects: it buffers)
        self._nc: Any = None
        self._cmd_sub: Any = None
        #: reports published since the last flush, in publish order: (number, subject, body, headers)
        self._inflight: list[tuple[int, str, bytes, dict[str, str]]] = []
        #: their numbers still waiting for an ack, and those the stream refused (see _on_ack)
        self._unacked: set[int] = set()
        self._refused: set[int] = set()
        self._acked = asyncio.Event()
        self._ack_prefix = ""
        self._published = 0
        #: live books whose quote / last trade are to be published at the next flush
        self._changed: dict[str, OrderBook] = {}
        self._traded: set[str] = set()
        self._snapshot_seq = 0
        self._stream_created = ""

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, replay EX_CMD, then consume live; returns once subscribed (work goes on in callbacks)."""
        nc = await self.ctx.links.wait_nats()
        js = nc.jetstream()
        self._js = js
        self._nc = nc
        self._ack_prefix = nc.new_inbox() + "."
        await nc.subscribe(self._ack_prefix + "*", cb=self._on_ack)
        await ensure_streams(js, (EX_CMD_STREAM, EX_EXEC_STREAM))
        info = await js.stream_info(subjects.STREAM_EX_CMD)
        self.replay_until = int(info.state.last_seq or 0)
        self._stream_created = str(info.created)
        start = await self._restore_snapshot(int(info.state.first_seq or 0))
        self.log.info("replaying commands", from_seq=start, up_to_seq=self.replay_until)
        if self.replay_until < start:
            await self._replay_done()
        self._cmd_sub = await js.subscribe(
            subjects.EX_CMD_ALL,
            cb=self._on_command,
            ordered_consumer=True,
            stream=subjects.STREAM_EX_CMD,
            pending_msgs_limit=1_000_000,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
        )
        await nc.subscribe(subjects.md_bar(Interval.M1, "*"), cb=self._on_bar)
        self.ctx.spawn(self._watchlist_loop(), "orderbook-watchlist")

    async def save_snapshot(self) -> None:
        """Every book and the exchange's own state at `processed_seq`, to Redis (a restart replays
        only the commands after it). Failures are logged: the stream alone is always enough."""
        await self._flush()
        seq = self.processed_seq
        if seq <= self._snapshot_seq:
            return
        body = {
            "stream_seq": seq,
            "stream_created": self._stream_created,
            "books": [book.dump() for book in self.books.values()],
            "orphan_seq": self._orphan_seq,
            "last_expiry": self._last_expiry,
        }
        try:
            await self.ctx.links.redis.set(SNAPSHOT_KEY, encode(body))
            self._snapshot_seq = seq
        except Exception as exc:
            self.log.warning("snapshot write failed", error=repr(exc))

    async def _restore_snapshot(self, first_seq: int) -> int:
        """Load the Redis snapshot if it belongs to this stream; the first stream seq to replay."""
        try:
            raw = await self.ctx.links.redis.get(SNAPSHOT_KEY)
            if not raw:
                return 1
            data = orjson.loads(raw)
            seq = int(data["stream_seq"])
            if (
                data.get("stream_created") != self._stream_created
                or seq > self.replay_until
                or seq + 1 < first_seq
            ):
                self.log.info("ignoring a snapshot of another stream", snapshot_seq=seq)
                return 1
            books = {b["symbol"]: OrderBook.restore(b) for b in data["books"]}
        except Exception as exc:
            self.log.warning("snapshot unreadable, replaying the whole stream", error=repr(exc))
            return 1
        self.books = books
        self._orphan_seq = {str(k): int(v) for k, v in data.get("orphan_seq", {}).items()}
        self._last_expiry = {
            str(k): datetime.fromisoformat(str(v).replace("Z", "+00:00"))
            for k, v in data.get("last_expiry", {}).items()
        }
        self.processed_seq = self._snapshot_seq = seq
        self.log.info("books restored from snapshot", snapshot_seq=seq, books=len(books))
        return seq + 1

    async def readiness(self) -> dict[str, str]:
        if self.ready.is_set():
            return {"books": "ok"}
        return {"books": f"replaying commands: {self.processed_seq}/{self.replay_until}"}

    # --- commands (stream order) ----------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        try:
            await self.process(msg.subject, msg.data, live=seq > self.replay_until)
        except Exception as exc:  # one bad command must never stop the book
            self.log.error("command failed", subject=msg.subject, seq=seq, error=repr(exc), exc_info=exc)
        self.processed_seq = seq
        sub = self._cmd_sub
        if len(self._inflight) >= _ACK_BATCH or sub is None or not sub.pending_msgs:
            try:
                await self._flush()
            except Exception as exc:
                self.log.error("report publishing failed", seq=seq, error=repr(exc), exc_info=exc)
        if not self.ready.is_set() and seq >= self.replay_until:
            await self._replay_done()
        every = self.settings.snapshot_every
        if every and seq - self._snapshot_seq >= every:
            await self.save_snapshot()

    async def process(self, subject: str, data: bytes, live: bool = True) -> None:
        """Apply one command from `ex.cmd.<token>` and publish what it caused."""
        symbol = symbol_from_token(subject.split(".", 2)[2])
        try:
            cmd: BookCommand = decode(data, BookCommand)  # type: ignore[arg-type]
        except ValidationError as exc:
            await self._malformed(symbol, data, str(exc))
            return
        if isinstance(cmd, OpenBookCmd):
            if await self._open(symbol) and live:
                self.ctx.spawn(self._first_quote(symbol), "first-quote")
            return
        book = self.books.get(symbol)
        if book is None:
            if isinstance(cmd, ExpireDayCmd | QuoteCmd):
                return
            await self._publish_reports(symbol, [self._orphan_reject(symbol, cmd)], None, live)
            return
        reports = book.apply(cmd)
        if isinstance(cmd, ExpireDayCmd):
            self._last_expiry[symbol] = cmd.t
        await self._publish_reports(symbol, reports, book, live)

    async def _open(self, symbol: str) -> bool:
        """Give `symbol` a book; False if it had one or cannot have one."""
        self._opening.discard(symbol)
        if symbol in self.books:
            return False
        try:
            book = OrderBook(symbol)
        except ValidationError as exc:
            self.log.warning("not opening a book", symbol=symbol, error=str(exc))
            return False
        book.seq = self._orphan_seq.pop(symbol, 0)
        self.books[symbol] = book
        self.log.info("book opened", symbol=symbol)
        return True

    async def _first_quote(self, symbol: str) -> None:
        """A book opened live is quoted at once around the streamer's latest 1m bar (from Redis), not
        only at the next bar, which can be a minute away in real time. The ladder's commands go
        through the stream like every re-quote, so a replay rebuilds the same book."""
        try:
            state = await self.liquidity(symbol)
            if not state.enabled:
                return
            # The streamer may not have written its latest bar yet (both just started): wait for it,
            # unless a bar arrives first (its re-quote does the job) or it takes longer than a bar.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _FIRST_QUOTE_WAIT
            while True:
                bar = self._last_bar.get(symbol) or await self._latest_bar(symbol)
                if self._bar_count.get(symbol):
                    return
                if bar is not None:
                    break
                if loop.time() >= deadline:
                    return
                await asyncio.sleep(0.5)
            async with self._agent_lock(symbol):
                await self._until_processed(self._agent_inflight.get(symbol, 0))  # a bar's re-quote
                book = self.books.get(symbol)
                if (
                    book is None
                    or self._bar_count.get(symbol)
                    or book.orders_of(LIQUIDITY_ACCOUNT_ID)
                    or not self._liquidity.get(symbol, state).enabled
                ):
                    return
                await self._requote(symbol, bar.c, bar.t + bar.interval.delta, state.config)
        except Exception as exc:  # the next bar quotes the book anyway
            self.log.warning("first quote failed", symbol=symbol, error=repr(exc))

    def _orphan_reject(self, symbol: str, cmd: BookCommand) -> ExecReport:
        seq = self._orphan_seq.get(symbol, 0) + 1
        self._orphan_seq[symbol] = seq
        assert not isinstance(cmd, OpenBookCmd | ExpireDayCmd | QuoteCmd)
        side = cmd.side if isinstance(cmd, NewOrderCmd) else Side.BUY
        return ExecReport(
            exec=ExecType.REJECTED,
            seq=seq,
            order_id=cmd.order_id,
            account_id=cmd.account_id,
            symbol=symbol,
            side=side,
            t=cmd.t,
            reason=f"symbol: {symbol} has no book on this exchange (not in the watchlist, no bars)",
            command=cmd.__struct_config__.tag if isinstance(cmd.__struct_config__.tag, str) else None,
        )

    async def _malformed(self, symbol: str, data: bytes, why: str) -> None:
        """A command that does not decode: rejected if it names an order, else only logged."""
        try:
            raw = orjson.loads(data)
            order_id = UUID(str(raw["order_id"]))
            account_id = UUID(str(raw["account_id"]))
            t = datetime.fromisoformat(str(raw["t"]).replace("Z", "+00:00"))
            side = Side(raw["side"]) if raw.get("side") in ("buy", "sell") else Side.BUY
        except Exception:
            self.log.warning("dropping an undecodable command", symbol=symbol, error=why)
            return
        book = self.books.get(symbol)
        if book is not None:
            book.seq += 1
            seq = book.seq
        else:
            seq = self._orphan_seq.get(symbol, 0) + 1
            self._orphan_seq[symbol] = seq
        report = ExecReport(
            exec=ExecType.REJECTED,
            seq=seq,
            order_id=order_id,
            account_id=account_id,
            symbol=symbol,
            side=side,
            t=t,
            reason=f"malformed command: {why}",
            command=str(raw.get("cmd")) if raw.get("cmd") else None,
        )
        await self._publish_reports(symbol, [report], book, live=True)

    async def _publish_reports(
        self, symbol: str, reports: list[ExecReport], book: OrderBook | None, live: bool
    ) -> None:
        if reports:
            last = await self._last_published_seq(symbol)
            subject = subjects.ex_exec(symbol)
            nc = self._nc
            for report in reports:
                if report.seq <= last - _ACK_BATCH:  # stored for certain (see the module docstring)
                    continue
                data = encode(report)
                headers = {"Nats-Msg-Id": f"{symbol}:{report.seq}"}
                self._published = n = self._published + 1
                self._inflight.append((n, subject, data, headers))
                self._unacked.add(n)
                self._acked.clear()
                with contextlib.suppress(Exception):  # left unacked: _flush publishes it again
                    await nc.publish(subject, data, reply=f"{self._ack_prefix}{n}", headers=headers)
                last = max(last, report.seq)
            self._last_published[symbol] = last
        if book is None:
            return
        prints = book.take_prints()
        if not live:
            return
        nc = self.ctx.links.nats
        for p in prints:
            await nc.publish(subjects.ex_trade(symbol), encode(p))
        if prints:
            self._traded.add(symbol)
        self._changed[symbol] = book

    async def _flush(self) -> None:
        """Publish the quote and last trade of every book changed since the last flush, then wait for
        the acks of the reports in flight (re-publishing, in order, from the first that failed).

        Quotes first: they leave in the same socket write as the reports, and the Redis round trip
        of the last trades overlaps the acks' (one wake-up of the loop less per batch)."""
        changed, self._changed = self._changed, {}
        traded, self._traded = self._traded, set()
        for book in changed.values():
            await self._publish_quote(book)
        for symbol in traded & changed.keys():
            await self._write_last_trade(changed[symbol])
        inflight, self._inflight = self._inflight, []
        if not inflight:
            return
        if self._unacked:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), _ACK_TIMEOUT)
        bad = self._unacked | self._refused
        self._unacked, self._refused = set(), set()
        if bad:
            first = min(bad)
            self.log.warning("reports not acknowledged, publishing them again", count=len(bad))
            for n, subject, data, headers in inflight:
                if n >= first:
                    await self._js_publish(subject, data, headers)

    async def _on_ack(self, msg: Msg) -> None:
        """The stream's answer to report number `<n>` (the reply subject's last token)."""
        n = int(msg.subject.rsplit(".", 1)[1])
        if n not in self._unacked:
            return  # late: its flush gave up on it and published it again
        self._unacked.discard(n)
        if ack_refusal(msg.headers, msg.data) is not None:
            self._refused.add(n)
        if not self._unacked:
            self._acked.set()

    async def _last_published_seq(self, symbol: str) -> int:
        last = self._last_published.get(symbol)
        if last is None:
            js = self._js
            assert js is not None
            try:
                msg = await js.get_last_msg(subjects.STREAM_EX_EXEC, subjects.ex_exec(symbol))
                last = decode(msg.data or b"", ExecReport).seq
            except NotFoundError:
                last = 0
            self._last_published[symbol] = last
        return last

    async def _js_publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        """Publish to JetStream until acknowledged (ids make the retries harmless); the stream seq."""
        delay = 0.1
        while True:
            try:
                js = self._js
                assert js is not None
                ack = await js.publish(subject, data, timeout=5, headers=headers)
                return int(ack.seq)
            except _RETRYABLE as exc:
                if self.ctx.stopping.is_set():
                    raise
                self.log.warning("jetstream publish failed, retrying", subject=subject, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _write_last_trade(self, book: OrderBook) -> None:
        price = book.last_price
        if price is None:
            return
        body = {"price": fmt(price), "t": iso(book.last_trade_t) if book.last_trade_t else None}
        try:
            await self.ctx.links.redis.set(keys.last_trade(book.symbol), orjson.dumps(body))
        except Exception as exc:
            self.log.warning("redis last trade write failed", symbol=book.symbol, error=repr(exc))

    async def _publish_quote(self, book: OrderBook) -> None:
        if not self.settings.publish_quotes:
            return
        top = (book.core.top(), book.core.last_tick)
        if self._tops.get(book.symbol) == top:
            return
        self._tops[book.symbol] = top
        with contextlib.suppress(Exception):
            await self.ctx.links.nats.publish(subjects.ex_quote(book.symbol), encode(book.quote()))

    async def _replay_done(self) -> None:
        self.ready.set()
        self.log.info("books rebuilt", books=len(self.books), up_to_seq=self.replay_until)
        for book in self.books.values():
            await self._write_last_trade(book)
            await self._publish_quote(book)

    # --- commands the exchange sends itself -----------------------------------------------------

    async def send(self, symbol: str, cmd: BookCommand) -> int:
        """Publish a command to `ex.cmd.<symbol>`; it is applied when consumed, like anyone's."""
        return await self._js_publish(subjects.ex_cmd(symbol), encode(cmd))

    async def request_book(self, symbol: str, t: datetime | None = None) -> None:
        """Make sure `symbol` gets a book (through the stream, so replays agree)."""
        if symbol in self.books or symbol in self._opening:
            return
        self._opening.add(symbol)
        try:
            await self.send(symbol, OpenBookCmd(symbol=symbol, t=t))
        except Exception:
            self._opening.discard(symbol)
            raise

    async def _watchlist_loop(self) -> None:
        await self.ready.wait()
        while True:
            try:
                raw = await self.ctx.links.redis.get(keys.WATCHLIST)
                if raw:
                    for s in orjson.loads(raw).get("symbols", []):
                        try:
                            await self.request_book(normalize_symbol(s))
                        except ValidationError:
                            continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("watchlist read failed", error=repr(exc))
            await asyncio.sleep(self.settings.watchlist_poll_seconds)

    # --- bars: books, DAY expiry, liquidity -----------------------------------------------------

    async def _on_bar(self, msg: Msg) -> None:
        try:
            bar = decode(msg.data, Bar)
            symbol = normalize_symbol(bar.symbol)
        except ValidationError as exc:
            self.log.warning("ignoring a bad bar", subject=msg.subject, error=str(exc))
            return
        self._last_bar[symbol] = bar
        if not self.ready.is_set():
            return
        try:
            t_end = bar.t + bar.interval.delta
            await self.request_book(symbol, t_end)
            await self._maybe_expire(symbol, bar.t, t_end)
            await self._maybe_requote(symbol, bar, t_end)
        except Exception as exc:
            self.log.error("bar handling failed", symbol=symbol, error=repr(exc), exc_info=exc)

    async def _maybe_expire(self, symbol: str, bar_t: datetime, t_end: datetime) -> None:
        """At the first bar that ends at or after a session close, expire DAY orders (a command)."""
        close = self._next_close.get(symbol)
        if close is None:
            book = self.books.get(symbol)
            since = min(bar_t, book.t) if book is not None and book.t is not None else bar_t
            last = self._last_expiry.get(symbol)
            if last is not None:
                since = max(since, last)
            close = calendar.next_close(since, symbol)
        if t_end < close:
            self._next_close[symbol] = close
            return
        # the latest close at or before the end of this bar (several if the feed jumped days)
        while True:
            after = calendar.next_close(close, symbol)
            if after > t_end:
                break
            close = after
        last = self._last_expiry.get(symbol)
        if last is None or last < close:
            self._last_expiry[symbol] = close
            await self.send(symbol, ExpireDayCmd(symbol=symbol, t=close))
        self._next_close[symbol] = calendar.next_close(close, symbol)

    async def _maybe_requote(self, symbol: str, bar: Bar, t_end: datetime) -> None:
        state = await self.liquidity(symbol)
        if not state.enabled:
            return
        n = self._bar_count.get(symbol, 0)
        self._bar_count[symbol] = n + 1
        if n % state.config.refresh_bars:
            return
        if self._agent_inflight.get(symbol, 0) > self.processed_seq:
            return  # the previous quotes are not applied yet: never stack a second ladder
        await self.requote(symbol, bar.c, t_end, state.config)

    async def requote(self, symbol: str, ref: Decimal, t: datetime, cfg: LiquidityConfig) -> None:
        """Cancel/replace the agent's ladder around `ref` (commands through the stream)."""
        async with self._agent_lock(symbol):
            state = self._liquidity.get(symbol)
            if state is not None and not state.enabled:
                return  # switched off while this re-quote waited
            # The previous ladder's commands first: reconcile against the book they make, never
            # stack a second ladder on one still in flight.
            await self._until_processed(self._agent_inflight.get(symbol, 0))
            await self._requote(symbol, ref, t, cfg)

    async def _requote(self, symbol: str, ref: Decimal, t: datetime, cfg: LiquidityConfig) -> None:
        inst = instrument(symbol)
        book = self.books.get(symbol)
        resting = (
            [
                (o["id"], o["side"], o["limit_price"], o["leaves_qty"])
                for o in book.orders_of(LIQUIDITY_ACCOUNT_ID)
            ]
            if book is not None
            else []
        )
        cancels, places = reconcile(resting, ladder(ref, cfg, inst.tick, inst.lot), cfg.min_fill_ratio)
        if not cancels and not places:
            return
        quote = QuoteCmd(
            symbol=symbol,
            account_id=LIQUIDITY_ACCOUNT_ID,
            t=t,
            cancels=tuple(cancels),
            places=tuple(
                NewOrderCmd(
                    order_id=uuid4(),
                    account_id=LIQUIDITY_ACCOUNT_ID,
                    symbol=symbol,
                    side=rung.side,
                    type=OrderType.LIMIT,
                    time_in_force=TimeInForce.GTC,
                    t=t,
                    qty=rung.qty,
                    limit_price=rung.price,
                    stp=SelfTradePrevention.CANCEL_OLDEST,
                )
                for rung in places
            ),
            reason="liquidity re-quote",
        )
        self._agent_inflight[symbol] = await self.send(symbol, quote)

    async def withdraw(self, symbol: str, t: datetime | None) -> None:
        """Cancel every order of the liquidity agent on `symbol`.

        Under the agent's lock, after its last re-quote is applied: a re-quote that was sending when
        the switch went off would otherwise place orders this withdrawal never saw (they stayed on
        the book for good)."""
        async with self._agent_lock(symbol):
            await self._until_processed(self._agent_inflight.get(symbol, 0))
            await self._withdraw(symbol, t)

    async def _withdraw(self, symbol: str, t: datetime | None) -> None:
        book = self.books.get(symbol)
        if book is None:
            return
        when = t or book.t or (self._last_bar[symbol].t if symbol in self._last_bar else None)
        if when is None:
            return
        cancels = tuple(o["id"] for o in book.orders_of(LIQUIDITY_ACCOUNT_ID))
        if cancels:
            quote = QuoteCmd(
                symbol=symbol,
                account_id=LIQUIDITY_ACCOUNT_ID,
                t=when,
                cancels=cancels,
                reason="liquidity off",
            )
            self._agent_inflight[symbol] = await self.send(symbol, quote)

    def _agent_lock(self, symbol: str) -> asyncio.Lock:
        return self._agent_locks.setdefault(symbol, asyncio.Lock())

    async def _until_processed(self, seq: int, timeout: float = 10.0) -> None:
        """Wait (bounded) until the command stream is applied up to `seq`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.processed_seq < seq and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def _latest_bar(self, symbol: str) -> Bar | None:
        """The streamer's latest 1m bar of `symbol` from Redis (when no bar has been seen yet)."""
        try:
            raw = await self.ctx.links.redis.get(keys.latest_bar(Interval.M1, symbol))
            if raw:
                bar = decode(raw, Bar)
                self._last_bar[symbol] = bar
                return bar
        except Exception as exc:
            self.log.info("no latest bar in redis", symbol=symbol, error=repr(exc))
        return None

    async def liquidity(self, symbol: str) -> LiquidityState:
        """The symbol's switch and config: cached, else Redis, else the settings' defaults."""
        state = self._liquidity.get(symbol)
        if state is not None:
            return state
        state = LiquidityState(self.settings.liquidity_enabled, self.settings.liquidity_config())
        try:
            raw = await self.ctx.links.redis.get(liquidity_key(symbol))
            if raw:
                state = _state_from_json(orjson.loads(raw), state)
        except Exception as exc:
            self.log.warning("liquidity flag read failed", symbol=symbol, error=repr(exc))
            return state
        self._liquidity[symbol] = state
        return state

    async def set_liquidity(self, symbol: str, changes: dict[str, Any]) -> LiquidityState:
        """Switch the agent on/off for `symbol` (and override its config); persisted in Redis."""
        old = await self.liquidity(symbol)
        state = _state_from_json(changes, old)
        await self.ctx.links.redis.set(liquidity_key(symbol), orjson.dumps(state.to_json(symbol)))
        self._liquidity[symbol] = state
        bar = self._last_bar.get(symbol) or await self._latest_bar(symbol)
        if not state.enabled:
            await self.withdraw(symbol, None)
        elif bar is not None and symbol in self.books:
            await self.requote(symbol, bar.c, bar.t + bar.interval.delta, state.config)
        return state


def _state_from_json(data: dict[str, Any], base: LiquidityState) -> LiquidityState:
    cfg = base.config
    updates: dict[str, Any] = {}
    for name in ("spread_bps", "size", "step_bps", "size_step"):
        if data.get(name) is not None:
            updates[name] = Decimal(str(data[name]))
    for name in ("levels", "refresh_bars"):
        if data.get(name) is not None:
            updates[name] = int(data[name])
    enabled = base.enabled if data.get("enabled") is None else bool(data["enabled"])
    return LiquidityState(enabled, replace(cfg, **updates) if updates else cfg)
