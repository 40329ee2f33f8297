"""`OrderBook`: one symbol's book speaking exact decimals and the `ex.cmd` / `ex.exec` messages.

It validates commands (bad ones become a rejected report and leave the book untouched), converts
prices and quantities to the integer ticks and lots of `papertrade.book.engine.Book`, and turns the
engine's events into `ExecReport`s (`to_exec_reports`), numbered by a per-book `seq`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any
from uuid import UUID

from papertrade.book import engine as E
from papertrade.book.commands import BookCommand, ExpireDayCmd, OpenBookCmd, QuoteCmd
from papertrade.book.native import native_book
from papertrade.enums import ExecType, LiquiditySide, OrderType, SelfTradePrevention, Side, TimeInForce
from papertrade.instruments import instrument
from papertrade.messages import CancelCmd, ExecReport, NewOrderCmd, Quote, ReplaceCmd, TradePrint
from papertrade.money import MAX_MAGNITUDE, fmt
from papertrade.symbols import normalize_symbol

NIL_ACCOUNT = UUID(int=0)

SIDE_CODE = {Side.BUY: E.BUY, Side.SELL: E.SELL}
SIDES = (Side.BUY, Side.SELL)
KIND_CODE = {
    OrderType.MARKET: E.MARKET,
    OrderType.LIMIT: E.LIMIT,
    OrderType.STOP: E.STOP,
    OrderType.STOP_LIMIT: E.STOP_LIMIT,
}
TIF_CODE = {TimeInForce.DAY: E.DAY, TimeInForce.GTC: E.GTC, TimeInForce.IOC: E.IOC, TimeInForce.FOK: E.FOK}
STP_CODE = {
    SelfTradePrevention.NONE: E.STP_NONE,
    SelfTradePrevention.CANCEL_NEWEST: E.CANCEL_NEWEST,
    SelfTradePrevention.CANCEL_OLDEST: E.CANCEL_OLDEST,
    SelfTradePrevention.CANCEL_BOTH: E.CANCEL_BOTH,
}
TIFS = {v: k for k, v in TIF_CODE.items()}
KINDS = {v: k for k, v in KIND_CODE.items()}


def default_engine() -> type[E.Book]:
    """The compiled engine if it is built and current, else the pure-Python one (same behaviour)."""
    return native_book() or E.Book


class BadCommand(ValueError):
    """A command the book refuses; the message is the reject reason."""


class OrderBook:
    """The book of one symbol. `apply(cmd)` returns the execution reports the command caused."""

    def __init__(self, symbol: str, engine: type[E.Book] | None = None) -> None:
        self.symbol = normalize_symbol(symbol)
        inst = instrument(self.symbol)
        self.tick_size: Decimal = inst.tick
        self.lot_size: Decimal = inst.lot
        #: the core: the compiled engine when built and current (papertrade.book.native), else pure
        self.core: E.Book = (engine or default_engine())()
        #: the seq of the last report this book produced (reports are numbered 1, 2, ...)
        self.seq = 0
        #: the time of the last command applied (simulation time), and of the last trade
        self.t: datetime | None = None
        self.last_trade_t: datetime | None = None
        self._prints: list[TradePrint] = []

    # --- commands -------------------------------------------------------------------------------

    def apply(self, cmd: BookCommand) -> list[ExecReport]:
        """Apply one command; its reports in order (rejected ones for bad commands)."""
        core = self.core
        if isinstance(cmd, OpenBookCmd):
            return []
        if cmd.t is not None:
            self.t = cmd.t
        if normalize_symbol(cmd.symbol) != self.symbol:
            oid = NIL_ACCOUNT if isinstance(cmd, ExpireDayCmd | QuoteCmd) else cmd.order_id
            acct = NIL_ACCOUNT if isinstance(cmd, ExpireDayCmd) else cmd.account_id
            core.reject(oid, acct, None, f"symbol: {cmd.symbol} is not this book's ({self.symbol})")
        elif isinstance(cmd, NewOrderCmd):
            self._new(cmd)
        elif isinstance(cmd, CancelCmd):
            core.cancel(cmd.order_id, cmd.reason or "canceled", cmd.account_id)
        elif isinstance(cmd, ReplaceCmd):
            self._replace(cmd)
        elif isinstance(cmd, ExpireDayCmd):
            core.expire_day(cmd.t)
        elif isinstance(cmd, QuoteCmd):
            self._quote(cmd)
        return self.drain(cmd.t)

    def drain(self, t: datetime) -> list[ExecReport]:
        """Turn the engine's pending events into reports stamped `t` (also collects trade prints)."""
        events = self.core.take_events()
        if not events:
            return []
        reports = to_exec_reports(events, self.symbol, self.tick_size, self.lot_size, t, self.seq)
        self.seq += len(reports)
        for ev in events:
            if ev[0] == E.EV_FILL:
                self.last_trade_t = t
                self._prints.append(
                    TradePrint(
                        symbol=self.symbol,
                        price=ev[4] * self.tick_size,
                        qty=ev[5] * self.lot_size,
                        t=t,
                        aggressor_side=SIDES[ev[2].side],
                        execution_id=f"{self.symbol}:{ev[1]}",
                    )
                )
        return reports

    def take_prints(self) -> list[TradePrint]:
        """The public trades since the last call (one per execution)."""
        prints = self._prints
        self._prints = []
        return prints

    # --- queries --------------------------------------------------------------------------------

    @property
    def last_price(self) -> Decimal | None:
        tick = self.core.last_tick
        return None if tick is None else tick * self.tick_size

    def top(self) -> tuple[tuple[Decimal, Decimal] | None, tuple[Decimal, Decimal] | None]:
        """((bid price, qty) or None, (ask price, qty) or None)."""
        bid, ask = self.core.top()
        return self._pq(bid), self._pq(ask)

    def spread(self) -> Decimal | None:
        s = self.core.spread()
        return None if s is None else s * self.tick_size

    def levels(self, side: Side, n: int | None = None) -> list[tuple[Decimal, Decimal, int]]:
        """Best first: (price, qty, number of orders)."""
        return [
            (tick * self.tick_size, lots * self.lot_size, count)
            for tick, lots, count in self.core.levels(SIDE_CODE[side], n)
        ]

    def level(self, side: Side, i: int) -> tuple[Decimal, Decimal, int] | None:
        rows = self.levels(side, i + 1)
        return rows[i] if len(rows) > i else None

    def depth(self, n: int | None = 10) -> dict[str, Any]:
        """The REST shape of CONTRACT.md (decimals as strings)."""
        return {
            "symbol": self.symbol,
            "bids": [
                {"price": fmt_price(p), "qty": fmt(q), "orders": c} for p, q, c in self.levels(Side.BUY, n)
            ],
            "asks": [
                {"price": fmt_price(p), "qty": fmt(q), "orders": c} for p, q, c in self.levels(Side.SELL, n)
            ],
            "last_price": fmt_price(self.last_price),
            "timestamp": self.t,
        }

    def quote(self, t: datetime | None = None) -> Quote:
        bid, ask = self.top()
        return Quote(
            symbol=self.symbol,
            t=t or self.t or datetime.min.replace(tzinfo=UTC),
            bid=bid[0] if bid else None,
            bid_size=bid[1] if bid else None,
            ask=ask[0] if ask else None,
            ask_size=ask[1] if ask else None,
            last=self.last_price,
        )

    def find(self, order_id: UUID) -> dict[str, Any] | None:
        """An open order in decimals, or None."""
        d = self.core.find(order_id)
        return None if d is None else self._order_view(d)

    def orders_of(self, account_id: UUID) -> list[dict[str, Any]]:
        return [self._order_view(d) for d in self.core.orders_of(account_id)]

    def snapshot(self) -> list[dict[str, Any]]:
        """Every open order, by side and priority, then dormant stops (to compare books)."""
        return [self._order_view(d) for d in self.core.open_orders()]

    def dump(self) -> dict[str, Any]:
        """The book's whole state as JSON-ready data (`OrderBook.restore` rebuilds it exactly)."""
        return {
            "symbol": self.symbol,
            "seq": self.seq,
            "t": self.t,
            "last_trade_t": self.last_trade_t,
            "core": self.core.dump(),
        }

    @classmethod
    def restore(cls, data: dict[str, Any], engine: type[E.Book] | None = None) -> OrderBook:
        """The book `dump` described; accepts the dump itself or its JSON round trip (strings for ids)."""
        book = cls(data["symbol"], engine)
        book.seq = int(data["seq"])
        book.t = _time(data["t"])
        book.last_trade_t = _time(data["last_trade_t"])
        core = dict(data["core"])
        core["orders"] = [_order_fields(f) for f in core["orders"]]
        core["stops"] = [_order_fields(f) for f in core["stops"]]
        core["queues"] = [[tick, [_uuid(i) for i in ids]] for tick, ids in core["queues"]]
        book.core = (engine or default_engine()).restore(core)
        return book

    # --- internals ------------------------------------------------------------------------------

    def _quote(self, cmd: QuoteCmd) -> None:
        core = self.core
        for oid in cmd.cancels:
            core.cancel(oid, cmd.reason or "canceled", cmd.account_id)
        for place in cmd.places:
            if normalize_symbol(place.symbol) != self.symbol or place.account_id != cmd.account_id:
                reason = (
                    f"quote: the quote of {cmd.account_id} on {self.symbol} holds an order of"
                    f" {place.account_id} on {place.symbol}"
                )
                core.reject(place.order_id, place.account_id, SIDE_CODE[place.side], reason)
            else:
                self._new(place)

    def _new(self, cmd: NewOrderCmd) -> None:
        core = self.core
        try:
            kind = KIND_CODE[cmd.type]
            lots = 0
            notional: int | None = None
            if (cmd.qty is None) == (cmd.notional is None):
                raise BadCommand("qty: give exactly one of qty and notional")
            if cmd.qty is not None:
                lots = self._lots(cmd.qty, "qty")
            else:
                notional = self._notional(cmd.notional)
            tick = None if cmd.limit_price is None else self._ticks(cmd.limit_price, "limit_price")
            stop = None if cmd.stop_price is None else self._ticks(cmd.stop_price, "stop_price")
        except BadCommand as exc:
            core.reject(cmd.order_id, cmd.account_id, SIDE_CODE[cmd.side], str(exc), "new")
            return
        core.submit(
            cmd.order_id,
            SIDE_CODE[cmd.side],
            kind,
            lots,
            tick,
            stop,
            TIF_CODE[cmd.time_in_force],
            cmd.all_or_none,
            STP_CODE[cmd.stp],
            cmd.account_id,
            cmd.t,
            notional,
        )

    def _replace(self, cmd: ReplaceCmd) -> None:
        core = self.core
        try:
            lots = None if cmd.qty is None else self._lots(cmd.qty, "qty")
            tick = None if cmd.limit_price is None else self._ticks(cmd.limit_price, "limit_price")
            stop = None if cmd.stop_price is None else self._ticks(cmd.stop_price, "stop_price")
        except BadCommand as exc:
            found = core.find(cmd.order_id)
            side = None if found is None else found["side"]
            core.reject(cmd.order_id, cmd.account_id, side, str(exc), "replace")
            return
        tif = None if cmd.time_in_force is None else TIF_CODE[cmd.time_in_force]
        core.replace(cmd.order_id, cmd.new_order_id, lots, tick, stop, tif, cmd.account_id, cmd.t)

    def _lots(self, qty: Decimal, field: str) -> int:
        _check_number(qty, field)
        n = qty / self.lot_size
        if n != n.to_integral_value():
            raise BadCommand(f"{field}: {fmt(qty)} is not a multiple of the lot size {fmt(self.lot_size)}")
        return int(n)

    def _ticks(self, price: Decimal, field: str) -> int:
        _check_number(price, field)
        n = price / self.tick_size
        if n != n.to_integral_value():
            raise BadCommand(
                f"{field}: {fmt(price)} is not a multiple of the tick size {fmt(self.tick_size)}"
            )
        return int(n)

    def _notional(self, value: Decimal | None) -> int:
        assert value is not None
        _check_number(value, "notional")
        units = int((value / (self.tick_size * self.lot_size)).to_integral_value(rounding=ROUND_DOWN))
        if units <= 0:
            raise BadCommand(f"notional: {fmt(value)} is too small")
        return units

    def _pq(self, row: tuple[int, int, int] | None) -> tuple[Decimal, Decimal] | None:
        if row is None:
            return None
        return row[0] * self.tick_size, row[1] * self.lot_size

    def _order_view(self, d: dict[str, Any]) -> dict[str, Any]:
        ts, ls = self.tick_size, self.lot_size
        return {
            "id": d["id"],
            "account_id": d["account"],
            "side": SIDES[d["side"]],
            "type": KINDS[d["kind"]],
            "time_in_force": TIFS[d["tif"]],
            "limit_price": None if d["tick"] is None else d["tick"] * ts,
            "stop_price": None if d["stop_tick"] is None else d["stop_tick"] * ts,
            "qty": d["qty"] * ls,
            "leaves_qty": d["leaves"] * ls,
            "filled_qty": d["cum"] * ls,
            "all_or_none": d["aon"],
            "state": d["state"],
        }


def to_exec_reports(
    events: Iterable[tuple[Any, ...]],
    symbol: str,
    tick_size: Decimal,
    lot_size: Decimal,
    t: datetime,
    last_seq: int = 0,
) -> list[ExecReport]:
    """THE conversion of engine events to `ExecReport`s, numbered from `last_seq + 1`.

    A fill gives two reports, taker first then maker, with exec ids `<symbol>:<n>:t` / `:m`
    (the public print of that execution is `<symbol>:<n>`).
    """
    out: list[ExecReport] = []
    seq = last_seq
    for ev in events:
        kind = ev[0]
        if kind == E.EV_FILL:
            _, n, taker, maker, tick, lots, t_cum, t_leaves, m_cum, m_leaves = ev
            price = tick * tick_size
            qty = lots * lot_size
            seq += 1
            out.append(
                ExecReport(
                    exec=ExecType.FILL,
                    seq=seq,
                    order_id=taker.oid,
                    account_id=taker.acct or NIL_ACCOUNT,
                    symbol=symbol,
                    side=SIDES[taker.side],
                    t=t,
                    exec_id=f"{symbol}:{n}:t",
                    price=price,
                    qty=qty,
                    cum_qty=t_cum * lot_size,
                    leaves_qty=t_leaves * lot_size,
                    liquidity=LiquiditySide.TAKER,
                    counter_order_id=maker.oid,
                )
            )
            seq += 1
            out.append(
                ExecReport(
                    exec=ExecType.FILL,
                    seq=seq,
                    order_id=maker.oid,
                    account_id=maker.acct or NIL_ACCOUNT,
                    symbol=symbol,
                    side=SIDES[maker.side],
                    t=t,
                    exec_id=f"{symbol}:{n}:m",
                    price=price,
                    qty=qty,
                    cum_qty=m_cum * lot_size,
                    leaves_qty=m_leaves * lot_size,
                    liquidity=LiquiditySide.MAKER,
                    counter_order_id=taker.oid,
                )
            )
            continue
        seq += 1
        if kind == E.EV_REJECTED:
            _, oid, acct, side, reason, command = ev
            out.append(
                ExecReport(
                    exec=ExecType.REJECTED,
                    seq=seq,
                    order_id=oid,
                    account_id=acct or NIL_ACCOUNT,
                    symbol=symbol,
                    side=SIDES[side] if side is not None else Side.BUY,
                    t=t,
                    reason=reason,
                    command=command,
                )
            )
            continue
        rec = ev[2] if kind == E.EV_REPLACED else ev[1]
        leaves = ev[4] if kind == E.EV_REPLACED else ev[2] if kind != E.EV_CANCELED else ev[3]
        # accepted / triggered / replaced: the state when the event happened
        cum = rec.qty - leaves if kind in (E.EV_ACCEPTED, E.EV_TRIGGERED, E.EV_REPLACED) else rec.cum
        base: dict[str, Any] = {
            "seq": seq,
            "order_id": rec.oid,
            "account_id": rec.acct or NIL_ACCOUNT,
            "symbol": symbol,
            "side": SIDES[rec.side],
            "t": t,
            "cum_qty": cum * lot_size,
            "leaves_qty": leaves * lot_size,
        }
        if kind == E.EV_ACCEPTED:
            out.append(
                ExecReport(
                    exec=ExecType.ACCEPTED,
                    qty=rec.qty * lot_size,
                    price=None if rec.tick is None else rec.tick * tick_size,
                    **base,
                )
            )
        elif kind == E.EV_CANCELED:
            out.append(ExecReport(exec=ExecType.CANCELED, reason=ev[2], **base))
        elif kind == E.EV_EXPIRED:
            out.append(
                ExecReport(
                    exec=ExecType.EXPIRED,
                    reason="day order expired at the session close",
                    **base,
                )
            )
        elif kind == E.EV_TRIGGERED:
            out.append(
                ExecReport(
                    exec=ExecType.TRIGGERED,
                    price=None if rec.tick is None else rec.tick * tick_size,
                    **base,
                )
            )
        elif kind == E.EV_REPLACED:
            base["order_id"] = ev[1]
            out.append(
                ExecReport(
                    exec=ExecType.REPLACED,
                    new_order_id=rec.oid,
                    qty=rec.qty * lot_size,
                    reason="priority kept" if ev[3] else "priority lost: back of the level",
                    **base,
                )
            )
    return out


def fmt_price(p: Decimal | None) -> str | None:
    """A price as a wire string with at least cents ("100.50", "0.0001")."""
    if p is None:
        return None
    text = fmt(p)
    assert text is not None
    if "." not in text:
        return text + ".00"
    whole, frac = text.split(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def _uuid(value: Any) -> Any:
    return value if isinstance(value, UUID) else UUID(str(value))


def _time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _order_fields(f: list[Any]) -> list[Any]:
    f = list(f)
    f[0] = _uuid(f[0])
    f[4] = None if f[4] is None else _uuid(f[4])
    f[12] = _time(f[12])
    return f


def _check_number(value: Decimal, field: str) -> None:
    if not isinstance(value, Decimal) or not value.is_finite():
        raise BadCommand(f"{field}: must be a finite number, got {value}")
    if value <= 0:
        raise BadCommand(f"{field}: must be greater than 0, got {fmt(value)}")
    if value > MAX_MAGNITUDE:
        raise BadCommand(f"{field}: {fmt(value)} is too large (limit {MAX_MAGNITUDE:,f})")
