"""What risk knows about one account: positions, open (reserved) orders and the day's realised P&L.

Pure and mutable: `reserve` when an order is approved, `apply_exec` for each execution report
(fills move positions and release reservations; canceled / expired / rejected / replaced release the
rest). The service keeps the same state in Redis (`to_redis` / `from_redis` fields) and the backtester
keeps it in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from typing import Any

import orjson

from papertrade.enums import ExecType, Side
from papertrade.messages import ExecReport
from papertrade.money import ZERO
from papertrade.timeutil import NEW_YORK

_RELEASING = (ExecType.CANCELED, ExecType.EXPIRED, ExecType.REJECTED, ExecType.REPLACED)


def can_change(report: ExecReport) -> bool:
    """Whether `AccountRiskState.apply_exec` may change anything for this report, whatever the state:
    a fill of a positive quantity at a price, or a report that releases an order. `accepted` and
    `triggered` never do (half of the reports), so the service acks them without asking Redis
    whether it has seen them or taking the account's lease."""
    if report.exec is ExecType.FILL:
        return report.qty is not None and report.price is not None and report.qty > 0
    return report.exec in _RELEASING


def session_day(t: datetime) -> date:
    """The trading day an instant belongs to: its date in New York (P&L resets at NY midnight).

    Every check asks, almost always about the same day: the last day's UTC bounds are kept, so an
    instant inside them costs two comparisons instead of a time zone conversion.
    """
    last = _last_day
    if t.tzinfo is UTC and last is not None and last[0] <= t < last[1]:
        return last[2]
    day = t.astimezone(NEW_YORK).date()
    if t.tzinfo is UTC:
        _remember_day(day)
    return day


#: the last New York day `session_day` answered: (its start, its end, both UTC; the day)
_last_day: tuple[datetime, datetime, date] | None = None


def _remember_day(day: date) -> None:
    global _last_day
    start = datetime.combine(day, dt_time(), NEW_YORK).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), dt_time(), NEW_YORK).astimezone(UTC)
    _last_day = (start, end, day)


@dataclass(slots=True)
class PositionState:
    """A signed position: qty > 0 long, < 0 short; `avg` its average entry price."""

    qty: Decimal = ZERO
    avg: Decimal = ZERO

    def to_json(self) -> bytes:
        return orjson.dumps({"q": str(self.qty), "a": str(self.avg)})

    @classmethod
    def from_json(cls, raw: bytes | str) -> PositionState:
        d = orjson.loads(raw)
        return cls(Decimal(d["q"]), Decimal(d["a"]))


@dataclass(slots=True)
class OpenOrder:
    """An approved order not yet done: `qty` is what is left to fill; `price` its reference price."""

    symbol: str
    side: Side
    qty: Decimal
    price: Decimal | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "s": self.symbol,
                "d": self.side.value,
                "q": str(self.qty),
                "p": None if self.price is None else str(self.price),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> OpenOrder:
        d = orjson.loads(raw)
        return cls(d["s"], Side(d["d"]), Decimal(d["q"]), None if d["p"] is None else Decimal(d["p"]))


@dataclass(slots=True)
class ExecEffect:
    """What one execution report changed (the service writes exactly this to Redis)."""

    position: tuple[str, PositionState | None] | None = None
    #: (order_id, new OpenOrder or None to remove) for each touched open order
    orders: list[tuple[str, OpenOrder | None]] = field(default_factory=list)
    day: tuple[date, Decimal] | None = None

    @property
    def empty(self) -> bool:
        return self.position is None and not self.orders and self.day is None


@dataclass
class AccountRiskState:
    positions: dict[str, PositionState] = field(default_factory=dict)
    open_orders: dict[str, OpenOrder] = field(default_factory=dict)
    #: the trading day of `realised`, and the P&L realised on it
    day: date | None = None
    realised: Decimal = ZERO
    _open_qty: dict[str, list[Decimal]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._rebuild_open_qty()

    # --- reading ---------------------------------------------------------------------------------

    def position_qty(self, symbol: str) -> Decimal:
        pos = self.positions.get(symbol)
        return pos.qty if pos is not None else ZERO

    def open_qty(self, symbol: str) -> tuple[Decimal, Decimal]:
        """(open buy qty, open sell qty) of the account's reserved orders in `symbol`."""
        agg = self._open_qty.get(symbol)
        return (agg[0], agg[1]) if agg is not None else (ZERO, ZERO)

    def open_symbols(self) -> Iterable[str]:
        """The symbols with open (reserved) orders."""
        return self._open_qty.keys()

    def symbols(self) -> set[str]:
        return set(self.positions) | set(self._open_qty)

    def realised_on(self, day: date) -> Decimal:
        return self.realised if self.day == day else ZERO

    def price_of(
        self, symbol: str, marks: Mapping[str, Decimal], skip: OpenOrder | None = None
    ) -> Decimal | None:
        """The price exposure is valued at: the mark, else the average entry, else an open order's
        price (not `skip`'s)."""
        mark = marks.get(symbol)
        if mark is not None:
            return mark
        pos = self.positions.get(symbol)
        if pos is not None and pos.qty != 0 and pos.avg != 0:
            return pos.avg
        for o in self.open_orders.values():
            if o.symbol == symbol and o.price is not None and o is not skip:
                return o.price
        return None

    def worst_range(self, symbol: str) -> tuple[Decimal, Decimal]:
        """(long, short) worst-case positions: every open buy fills / every open sell fills."""
        pos = self.position_qty(symbol)
        buys, sells = self.open_qty(symbol)
        return pos + buys, pos - sells

    def symbol_exposure(self, symbol: str, marks: Mapping[str, Decimal]) -> Decimal:
        long, short = self.worst_range(symbol)
        worst = max(abs(long), abs(short))
        if worst == 0:
            return ZERO
        price = self.price_of(symbol, marks)
        return worst * price if price is not None else ZERO

    def gross_exposure(self, marks: Mapping[str, Decimal], exclude: str | None = None) -> Decimal:
        total = ZERO
        for symbol in self.positions:
            if symbol != exclude:
                total += self.symbol_exposure(symbol, marks)
        for symbol in self._open_qty:
            if symbol != exclude and symbol not in self.positions:
                total += self.symbol_exposure(symbol, marks)
        return total

    def unrealised(self, marks: Mapping[str, Decimal]) -> Decimal:
        """Sum of qty x (mark - average entry) over positions with a mark."""
        total = ZERO
        for symbol, pos in self.positions.items():
            mark = marks.get(symbol)
            if mark is not None and pos.qty != 0:
                total += pos.qty * (mark - pos.avg)
        return total

    def day_pnl(self, day: date, marks: Mapping[str, Decimal]) -> Decimal:
        return self.realised_on(day) + self.unrealised(marks)

    def copy(self) -> AccountRiskState:
        return AccountRiskState(
            {s: PositionState(p.qty, p.avg) for s, p in self.positions.items()},
            {k: OpenOrder(o.symbol, o.side, o.qty, o.price) for k, o in self.open_orders.items()},
            self.day,
            self.realised,
        )

    # --- changing --------------------------------------------------------------------------------

    def reserve(
        self,
        order_id: str,
        symbol: str,
        side: Side,
        qty: Decimal,
        price: Decimal | None,
        replaces: str | None,
    ) -> OpenOrder:
        """Record an approved order as open (and drop the order it replaces)."""
        if replaces is not None:
            self.release(replaces)
        order = OpenOrder(symbol, side, qty, price)
        self.release(order_id)
        self.open_orders[order_id] = order
        self._add_open(order, 1)
        return order

    def release(self, order_id: str) -> OpenOrder | None:
        order = self.open_orders.pop(order_id, None)
        if order is not None:
            self._add_open(order, -1)
        return order

    def apply_exec(self, report: ExecReport) -> ExecEffect:
        """Apply one execution report; returns what changed (empty if nothing did)."""
        effect = ExecEffect()
        if not can_change(report):
            return effect
        oid = str(report.order_id)
        if report.exec is ExecType.FILL:
            assert report.qty is not None and report.price is not None
            effect.position = (report.symbol, self._fill_position(report))
            effect.day = (self.day, self.realised) if self.day is not None else None
            order = self.open_orders.get(oid)
            if order is not None:
                left = report.leaves_qty if report.leaves_qty is not None else order.qty - report.qty
                self.release(oid)
                if left > 0:
                    self.open_orders[oid] = OpenOrder(order.symbol, order.side, left, order.price)
                    self._add_open(self.open_orders[oid], 1)
                    effect.orders.append((oid, self.open_orders[oid]))
                else:
                    effect.orders.append((oid, None))
        elif self.release(oid) is not None:
            effect.orders.append((oid, None))
        return effect

    # --- internals -------------------------------------------------------------------------------

    def _fill_position(self, report: ExecReport) -> PositionState | None:
        assert report.qty is not None and report.price is not None
        day = session_day(report.t)
        if self.day is None or day > self.day:
            self.day, self.realised = day, ZERO
        price, q = report.price, report.qty
        signed = q if report.side is Side.BUY else -q
        pos = self.positions.get(report.symbol) or PositionState()
        old = pos.qty
        new = old + signed
        if old == 0 or (old > 0) == (signed > 0):
            avg = (abs(old) * pos.avg + q * price) / (abs(old) + q)
        else:
            closed = min(q, abs(old))
            pnl = closed * (price - pos.avg) * (1 if old > 0 else -1)
            if day == self.day:
                self.realised += pnl
            if new == 0:
                avg = ZERO
            elif (new > 0) != (old > 0):
                avg = price
            else:
                avg = pos.avg
        if new == 0:
            self.positions.pop(report.symbol, None)
            return None
        state = PositionState(new, avg)
        self.positions[report.symbol] = state
        return state

    def _add_open(self, order: OpenOrder, sign: int) -> None:
        agg = self._open_qty.setdefault(order.symbol, [ZERO, ZERO])
        agg[0 if order.side is Side.BUY else 1] += sign * order.qty
        if agg[0] == 0 and agg[1] == 0:
            del self._open_qty[order.symbol]

    def _rebuild_open_qty(self) -> None:
        self._open_qty = {}
        for order in self.open_orders.values():
            self._add_open(order, 1)


def state_from_redis(
    positions: Mapping[Any, Any], open_orders: Mapping[Any, Any], day: bytes | str | None
) -> AccountRiskState:
    """Build the state from the Redis hashes (values as `to_json` wrote them)."""
    pos = {_s(k): PositionState.from_json(v) for k, v in positions.items()}
    opens = {_s(k): OpenOrder.from_json(v) for k, v in open_orders.items()}
    d: date | None = None
    realised = ZERO
    if day:
        raw = orjson.loads(day)
        d, realised = date.fromisoformat(raw["d"]), Decimal(raw["r"])
    return AccountRiskState(pos, opens, d, realised)


def day_to_json(day: date, realised: Decimal) -> bytes:
    return orjson.dumps({"d": day.isoformat(), "r": str(realised)})


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
