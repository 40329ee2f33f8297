"""The backtester: bars replayed through the same pure cores the services use, in bar time.

One process, no NATS, no wall clock. Per bar (in time order, symbols in the order given):

1. the symbol's synthetic liquidity (`papertrade.book.liquidity`, the model the orderbook service runs)
   is refreshed from that bar, but only when it can matter: the strategy has an order working in that
   book, or sends one (the book is otherwise untouched, which keeps the per-bar path lean);
2. the strategy gets `on_bar(bar)` (and `on_periodic` when due) through the same `Driver` the live
   runner uses;
3. the orders it sent go, in order, through the broker's checks (buying power with the ledger's
   reservation math), the risk rules (`papertrade.risk`, when limits are given) and the matching
   engine (`papertrade.book.Book`); executions are booked by the ledger (`papertrade.ledger.Ledger`,
   with its commission model), and the strategy gets the resulting trade updates (Alpaca's shape),
   after which the orders those callbacks sent go the same way, until nothing is left.

Same inputs, same fills: ids are derived from counters, never from randomness or the clock.
"""

from __future__ import annotations

import bisect
import gc
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, SafeUUID

import msgspec
import numpy as np
import pandas as pd

from papertrade.backtest.liquidity import LiquidityConfig, LiquiditySim, book_class
from papertrade.bars.aggregate import aggregate
from papertrade.bars.frame import to_frame
from papertrade.bars.series import BarSeries, to_decimal_str
from papertrade.book import engine as eng
from papertrade.enums import ExecType, Interval, OrderStatus, OrderType, Side, TimeInForce
from papertrade.errors import ValidationError
from papertrade.instruments import instrument
from papertrade.ledger import CommissionModel, Ledger, reservation
from papertrade.messages import ExecReport, TradeUpdate
from papertrade.models import Bar, Order, Position
from papertrade.money import ZERO
from papertrade.strategy.base import Strategy
from papertrade.strategy.context import AccountSnapshot, OrderRequest
from papertrade.strategy.driver import Driver, State
from papertrade.strategy.wire import order_to_alpaca
from papertrade.timeutil import EPOCH

#: The account a backtest trades as (a fixed id: results do not depend on randomness).
BACKTEST_ACCOUNT_ID = UUID("00000000-0000-4000-8000-0000000000b7")
#: How many rounds of "callbacks send orders, orders make updates" one bar may cause.
MAX_ROUNDS = 1000

_SIDE = {Side.BUY: eng.BUY, Side.SELL: eng.SELL}
_KIND = {
    OrderType.MARKET: eng.MARKET,
    OrderType.LIMIT: eng.LIMIT,
    OrderType.STOP: eng.STOP,
    OrderType.STOP_LIMIT: eng.STOP_LIMIT,
}
_TIF = {
    TimeInForce.DAY: eng.DAY,
    TimeInForce.GTC: eng.GTC,
    TimeInForce.IOC: eng.IOC,
    TimeInForce.FOK: eng.FOK,
}
_UUID_V4 = (4 << 76) | (2 << 62)
#: the bits every backtest order id has (a v4 UUID whose node field says b7), the order's number aside
_OID_BITS = _UUID_V4 | (0xB7 << 80)
_EV_ACCEPTED = eng.EV_ACCEPTED
_EV_FILL = eng.EV_FILL
_EV_CANCELED = eng.EV_CANCELED
_EV_EXPIRED = eng.EV_EXPIRED
_EV_REJECTED = eng.EV_REJECTED
#: The strategy account's tag inside the backtester's books.
_BT = 1


class FillRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One execution of the strategy's orders, as the report lists it."""

    t: datetime
    symbol: str
    side: Side
    qty: Decimal
    price: Decimal
    fee: Decimal
    order_id: UUID
    execution_id: str
    liquidity: str
    position_qty: Decimal
    realized_pl: Decimal


@dataclass(frozen=True)
class OrderRecord:
    """One order the strategy sent, with its final state."""

    order: Order


@dataclass
class BacktestConfig:
    cash: Decimal = Decimal("100000")
    commission: CommissionModel = field(default_factory=CommissionModel)
    shorting_enabled: bool = True
    #: Risk limits (a `papertrade.risk` Limits object, or a dict of them); None: no risk checks.
    limits: Any = None
    liquidity: LiquidityConfig = field(default_factory=LiquidityConfig)
    #: Synthetic liquidity on (the orderbook's default) or off (only the strategy's own orders).
    liquidity_enabled: bool = True
    #: Market hours of the data: `regular` (NYSE) or `24/7`; DAY orders expire at the session close.
    hours: str = "regular"
    progress: bool = False


@dataclass
class RawResult:
    """What one run produced, before the metrics (see `papertrade.backtest.report`)."""

    strategy: str
    params: dict[str, Any]
    symbols: tuple[str, ...]
    interval: Interval
    start: datetime | None
    end: datetime | None
    starting_cash: Decimal
    final_cash: Decimal
    final_equity: Decimal
    fees: Decimal
    realized_pl: Decimal
    positions: dict[str, Position]
    fills: list[FillRecord]
    orders: list[Order]
    #: Equity sampled at every bar time (float dollars, for curves and statistics).
    equity_t: np.ndarray
    equity: np.ndarray
    #: Gross exposure (sum |qty * price|) at the same times.
    exposure: np.ndarray
    prices: dict[str, BarSeries]
    bars: int
    bars_seen: int
    orders_sent: int
    state: str
    error: str | None
    traceback: str | None
    elapsed_s: float


class BacktestContext:
    """The simulated broker + exchange a strategy trades through in a backtest (a StrategyContext)."""

    def __init__(self, data: Mapping[str, BarSeries], config: BacktestConfig) -> None:
        self.config = config
        self.data = dict(data)
        self.symbols = list(data)
        self.ledger = Ledger(cash=config.cash, commission=config.commission)
        self.books: dict[str, Any] = {s: book_class()() for s in data}
        self.instruments = {s: instrument(s) for s in data}
        self.liquidity = {s: LiquiditySim(s, config.liquidity, config.liquidity_enabled) for s in data}
        self.risk = _RiskAdapter(config.limits) if config.limits is not None else None
        self.driver: Driver | None = None
        self.delta = next(iter(data.values())).interval.delta if data else timedelta(0)
        #: the open time of the latest bar, its merged index, and its end in epoch ns
        self.bar_t: datetime = EPOCH
        self.k = -1
        self.t_ns = 0
        #: per symbol: how many of its bars have been seen, and its close column
        self.cursor: dict[str, int] = dict.fromkeys(data, 0)
        self.closes: dict[str, list[Decimal]] = {}
        self.orders: dict[int, Order] = {}
        self.open: dict[int, Order] = {}
        self.by_uuid: dict[UUID, int] = {}
        #: strategy orders open per symbol (accepted by the broker, not final yet)
        self.working: dict[str, int] = dict.fromkeys(data, 0)
        #: a liquidity refresh deferred until it matters: the reference price it would use
        self.stale: dict[str, Decimal | None] = dict.fromkeys(data)
        self.pending: list[tuple[str, int]] = []
        self.updates: list[TradeUpdate] = []
        self.fills: list[FillRecord] = []
        #: per fill: the merged bar index it happened at, and the cash after it (float)
        self.fill_k: list[int] = []
        self.fill_cash: list[float] = []
        self._seq = 0
        self._exec_seq = 0
        self._wants_updates = False
        self._no_fees = config.commission.kind == "none"
        #: symbols whose maker re-quotes at every due bar (the strategy works orders there, or a rung
        #: is partly taken); elsewhere the ladder is deferred (`stale`)
        self.active: set[str] = set()
        #: orders sent or updates queued since the last settle
        self.dirty = False
        #: the single-symbol fast loop leaves time and cursors to be derived from `k` on demand:
        #: (symbol, open times, closes, bar times in ns, interval in ns)
        self.fast: tuple[str, list[datetime], list[Decimal], list[int], int] | None = None
        self._synced = -1

    # --- StrategyContext -------------------------------------------------------------------------

    def now(self) -> datetime:
        if self.fast is not None:
            self.sync()
        return self.bar_t + self.delta

    def sync(self) -> None:
        """Bring time, the cursor and the deferred ladder up to bar `k` (the fast loop sets only `k`)."""
        fast = self.fast
        k = self.k
        if fast is None or self._synced == k or k < 0:
            return
        self._synced = k
        symbol, ts, closes, times, step = fast
        self.cursor[symbol] = k + 1
        self.bar_t = ts[k]
        self.t_ns = times[k] + step
        if symbol not in self.active:
            self.stale[symbol] = closes[k]

    def submit(self, request: OrderRequest) -> Order:
        self._seq += 1
        eid = self._seq
        oid = _uuid(eid | _OID_BITS)
        if self.fast is not None:
            self.sync()
        now = self.bar_t + self.delta
        order = request.to_order(
            id=oid,
            client_order_id=request.client_order_id or f"bt-{eid}",
            account_id=BACKTEST_ACCOUNT_ID,
            now=now,
            status=OrderStatus.ACCEPTED,
        )
        self.orders[eid] = order
        self.by_uuid[oid] = eid
        reason = self._check(order)
        if reason is None and self.risk is not None:
            reason, clipped = self.risk.check(self, order)
            if clipped is not None:
                order.qty = clipped
        if reason is not None:
            order.status = OrderStatus.REJECTED
            order.reason = reason
            order.failed_at = now
            self._update("rejected", order)
            return msgspec.structs.replace(order)
        self.open[eid] = order
        self.working[order.symbol] += 1
        self.active.add(order.symbol)
        self.pending.append(("new", eid))
        self.dirty = True
        # a snapshot, as the broker's answer over the network is
        return msgspec.structs.replace(order)

    def cancel(self, order_id: UUID) -> None:
        eid = self.by_uuid.get(order_id)
        if eid is not None and eid in self.open:
            self.pending.append(("cancel", eid))
            self.dirty = True

    def cancel_all(self) -> None:
        for eid in list(self.open):
            self.pending.append(("cancel", eid))
            self.dirty = True

    def close_all(self) -> list[Order]:
        self.cancel_all()
        out = []
        for symbol, pos in sorted(self.ledger.positions.items()):
            if pos.qty:
                side = Side.SELL if pos.qty > 0 else Side.BUY
                out.append(self.submit(OrderRequest(symbol=symbol, side=side, qty=abs(pos.qty))))
        return out

    def position(self, symbol: str) -> Position:
        p = self.ledger.positions.get(symbol)
        if p is None:
            return Position(account_id=BACKTEST_ACCOUNT_ID, symbol=symbol)
        return Position(
            account_id=BACKTEST_ACCOUNT_ID,
            symbol=symbol,
            qty=p.qty,
            avg_entry_price=p.avg_entry_price,
            realized_pl=p.realized_pl,
        )

    def positions(self) -> list[Position]:
        return [self.position(s) for s, p in sorted(self.ledger.positions.items()) if p.qty]

    def account(self) -> AccountSnapshot:
        prices = self.marks()
        long_mv = ZERO
        short_mv = ZERO
        for s, p in self.ledger.positions.items():
            mv = p.qty * prices[s]
            if mv > 0:
                long_mv += mv
            else:
                short_mv += mv
        return AccountSnapshot(
            cash=self.ledger.cash,
            equity=self.ledger.cash + long_mv + short_mv,
            buying_power=self.ledger.buying_power(prices, self._reserved(prices)),
            long_market_value=long_mv,
            short_market_value=short_mv,
            fees=self.ledger.fees,
            realized_pl=self.ledger.realized_pl,
        )

    def open_orders(self) -> list[Order]:
        return [msgspec.structs.replace(o) for o in self.open.values()]

    def history(self, symbol: str, interval: str, n: int) -> pd.DataFrame:
        self.sync()
        series = self.data.get(symbol)
        if series is None:
            raise ValidationError("symbol", f"{symbol} is not in this backtest ({', '.join(self.data)})")
        iv = Interval.parse(interval)
        seen = series.take(slice(0, self.cursor[symbol]))
        if iv != series.interval:
            seen = aggregate(seen, iv, hours=self.config.hours)
            # the last bucket is complete only once the clock has reached its end
            if len(seen) and self.t_ns < int(seen.t[-1]) + iv.seconds * 1_000_000_000:
                seen = seen.take(slice(0, len(seen) - 1))
        return to_frame(seen.take(slice(max(0, len(seen) - n), len(seen))))

    # --- the simulation --------------------------------------------------------------------------

    def bind(self, driver: Driver) -> None:
        self.driver = driver
        cls = type(driver.strategy)
        self._wants_updates = (
            cls.on_fill is not Strategy.on_fill or cls.on_order_update is not Strategy.on_order_update
        )

    def last_price(self, symbol: str) -> Decimal | None:
        self.sync()
        i = self.cursor.get(symbol, 0)
        return self.closes[symbol][i - 1] if i else None

    def marks(self) -> dict[str, Decimal]:
        """The latest close of every symbol seen (positions without one: their entry price)."""
        self.sync()
        prices = {s: self.closes[s][i - 1] for s, i in self.cursor.items() if i}
        for s, p in self.ledger.positions.items():
            if s not in prices:
                prices[s] = p.avg_entry_price
        return prices

    def requote(
        self,
        symbol: str,
        ref: Decimal,
        maker_only: bool = False,
        only_side: int | None = None,
        only_lots: int = 0,
    ) -> None:
        """The market maker of `symbol` re-quotes around `ref` now (events applied). `maker_only`:
        nothing of the strategy's is in that book, so the events can only be the maker's own;
        `only_side` / `only_lots`: see `LiquiditySim.refresh`."""
        self.sync()
        self.stale[symbol] = None
        book = self.books[symbol]
        self.liquidity[symbol].refresh(book, ref, self.t_ns, only_side, only_lots)
        if maker_only:
            book.take_events()
        elif book.events:
            self._apply(symbol, book.take_events())
        self._maybe_withdraw(symbol)

    def settle(self) -> None:
        """Run the orders the last callback sent, deliver the updates, repeat until quiet."""
        self.sync()
        rounds = 0
        driver = self.driver
        while self.pending or self.updates:
            rounds += 1
            if rounds > MAX_ROUNDS:
                raise RuntimeError(f"more than {MAX_ROUNDS} rounds of orders and updates at one bar")
            pending = self.pending
            self.pending = []
            for verb, eid in pending:
                self._send(verb, eid)
            updates = self.updates
            self.updates = []
            if driver is not None:
                for u in updates:
                    driver.update(u)
        self.dirty = False

    def expire_day(self, cutoff_ns: int) -> None:
        """DAY orders entered at or before the session close `cutoff_ns` expire (as the orderbook does)."""
        self.sync()
        for symbol, book in self.books.items():
            if self.working[symbol]:
                book.expire_day(cutoff_ns)
                self._apply(symbol, book.take_events())
                self._maybe_withdraw(symbol)

    # --- internals -------------------------------------------------------------------------------

    def _reserved(self, prices: Mapping[str, Decimal]) -> Decimal:
        total = ZERO
        open_qty: dict[tuple[str, Side], Decimal] = {}
        for o in self.open.values():
            if o.notional is not None and o.qty is None:
                total += o.notional if o.side is Side.BUY else ZERO
                continue
            qty = (o.qty or ZERO) - o.filled_qty
            price = o.limit_price or o.stop_price or prices.get(o.symbol, ZERO)
            key = (o.symbol, o.side)
            prior = open_qty.get(key, ZERO)
            total += reservation(o.side, qty, price, self.ledger.position(o.symbol).qty, prior)
            open_qty[key] = prior + qty
        return total

    def _check(self, order: Order) -> str | None:
        """The broker's checks: symbol known, prices on the tick grid, whole lots, buying power."""
        symbol = order.symbol
        inst = self.instruments.get(symbol)
        if inst is None:
            return f"unknown symbol {symbol}: this backtest trades {', '.join(self.data)}"
        limit_price = order.limit_price
        stop_price = order.stop_price
        if limit_price is not None and limit_price % inst.tick:
            return f"limit_price {limit_price} is not a multiple of the tick size {inst.tick}"
        if stop_price is not None and stop_price % inst.tick:
            return f"stop_price {stop_price} is not a multiple of the tick size {inst.tick}"
        qty = order.qty
        if qty is not None and qty % inst.lot:
            return f"qty {qty} is not a multiple of the lot size {inst.lot}"
        last = self.last_price(symbol)
        if last is None:
            return f"no price for {symbol} yet"
        ledger = self.ledger
        held_pos = ledger.positions.get(symbol)
        pos_qty = held_pos.qty if held_pos is not None else ZERO
        side = order.side
        same = ZERO
        open_orders = self.open
        if open_orders:
            same = sum(
                (
                    (o.qty or ZERO) - o.filled_qty
                    for o in open_orders.values()
                    if o.symbol == symbol and o.side is side
                ),
                ZERO,
            )
        if side is Side.SELL and not self.config.shorting_enabled and qty is not None:
            held = pos_qty - same
            if qty > held:
                return (
                    f"insufficient qty available for order (requested: {qty}, available: {max(held, ZERO)})"
                )
        if order.notional is not None:
            needs = order.notional if side is Side.BUY else ZERO
        else:
            est = limit_price or stop_price or last
            needs = reservation(side, qty or ZERO, est, pos_qty, same)
        if needs > 0:
            if not open_orders and all(p.qty >= 0 for p in ledger.positions.values()):
                power = max(ledger.cash, ZERO)
            else:
                prices = self.marks()
                power = ledger.buying_power(prices, self._reserved(prices))
            if needs > power:
                return f"insufficient buying power: needs {needs:.2f}, has {power:.2f}"
        return None

    def _send(self, verb: str, eid: int) -> None:
        order = self.orders[eid]
        symbol = order.symbol
        book = self.books[symbol]
        ref = self.stale[symbol]
        half = False
        if ref is not None:
            # a deferred ladder: the book holds nothing of the strategy's (every send of this
            # symbol re-places the ladder first, and the ladder is only deferred when idle). A lone
            # market order meets only the other side: the rest of the ladder is placed if it stays.
            half = verb == "new" and order.type is OrderType.MARKET and self.working[symbol] == 1
            only = (eng.SELL if order.side is Side.BUY else eng.BUY) if half else None
            # of a size known in lots, it reaches only the best rungs that hold that many
            lots = (
                int(order.qty / self.instruments[symbol].lot)
                if half and order.qty is not None and order.notional is None
                else 0
            )
            # requote(symbol, ref, maker_only=True, ...), inline: this runs for most orders
            self.stale[symbol] = None
            self.liquidity[symbol].refresh(book, ref, self.t_ns, only, lots)
            book.take_events()
            if not self.working[symbol]:
                self._maybe_withdraw(symbol)
        if verb == "cancel":
            if eid in self.open:
                book.cancel(eid, "canceled", _BT)
        else:
            inst = self.instruments[symbol]
            tick = inst.tick
            side = _SIDE[order.side]
            lots = int(order.qty / inst.lot) if order.qty is not None else 0
            kind = _KIND[order.type]
            tif = _TIF[order.time_in_force]
            t = self.t_ns
            if order.notional is None and not order.all_or_none and kind == eng.MARKET:
                book.market(eid, side, lots, _BT, tif, eng.STP_NONE, t)
            elif order.notional is None and not order.all_or_none and kind == eng.LIMIT:
                assert order.limit_price is not None
                book.limit(eid, side, int(order.limit_price / tick), lots, _BT, tif, eng.STP_NONE, t)
            else:
                book.submit(
                    eid,
                    side,
                    kind,
                    lots,
                    int(order.limit_price / tick) if order.limit_price is not None else None,
                    int(order.stop_price / tick) if order.stop_price is not None else None,
                    tif,
                    order.all_or_none,
                    eng.STP_NONE,
                    _BT,
                    t,
                    int(order.notional / (tick * inst.lot)) if order.notional is not None else None,
                )
        self._apply(symbol, book.take_events())
        if not self.working[symbol]:
            self._maybe_withdraw(symbol)
        if half:
            sim = self.liquidity[symbol]
            if sim.half:  # not withdrawn: the other side is part of the maker's ladder from now on
                book = self.books[symbol]
                sim.complete(book, self.t_ns)
                book.take_events()

    def _maybe_withdraw(self, symbol: str) -> None:
        """Nothing of the strategy's is working in this book: the maker's rungs can leave it (the
        next order there re-places the target of the latest due refresh, which is exactly the
        ladder the maker would then have)."""
        if not self.working[symbol]:
            sim = self.liquidity[symbol]
            if not sim.partial:
                self.books[symbol] = sim.withdraw(self.books[symbol])
                self.active.discard(symbol)
                if self.stale[symbol] is None:
                    # re-placing the latest target restores exactly the ladder taken off
                    self.stale[symbol] = sim.last_ref

    def _apply(self, symbol: str, events: list[tuple[Any, ...]]) -> None:
        """Engine events -> order states, ledger fills and trade updates (the strategy's orders)."""
        orders = self.orders
        sim = self.liquidity[symbol]
        for ev in events:
            kind = ev[0]
            if kind == _EV_FILL:
                taker = ev[2]
                maker = ev[3]
                if taker.acct == _BT:
                    self._fill(symbol, taker, ev[4], ev[5], "taker")
                elif sim.filled(taker.oid, ev[5], ev[7]):
                    self.active.add(symbol)
                if maker.acct == _BT:
                    self._fill(symbol, maker, ev[4], ev[5], "maker")
                elif sim.filled(maker.oid, ev[5], ev[9]):
                    self.active.add(symbol)
                continue
            if kind == _EV_REJECTED:
                if ev[2] != _BT or ev[5] == "cancel":
                    continue
                order = orders[ev[1]]
                order.status = OrderStatus.REJECTED
                order.reason = ev[4]
                order.failed_at = order.updated_at = self.now()
                self._close(ev[1], order)
                self._update("rejected", order)
                continue
            rec = ev[1]
            if rec.acct != _BT:
                continue
            eid = rec.oid
            order = orders[eid]
            if kind == _EV_ACCEPTED:
                order.status = OrderStatus.NEW
                order.updated_at = self.now()
                self._update("new", order)
            elif kind == _EV_CANCELED:
                order.status = OrderStatus.CANCELED
                order.canceled_at = order.updated_at = self.now()
                order.reason = ev[2]
                self._close(eid, order)
                self._update("canceled", order)
            elif kind == _EV_EXPIRED:
                order.status = OrderStatus.EXPIRED
                order.expired_at = order.updated_at = self.now()
                self._close(eid, order)
                self._update("expired", order)

    def _fill(self, symbol: str, rec: Any, tick: int, lots: int, liquidity: str) -> None:
        eid = rec.oid
        order = self.orders[eid]
        inst = self.instruments[symbol]
        price = _dec(tick) * inst.tick
        qty = _dec(lots) * inst.lot
        if self.fast is not None:
            self.sync()
        now = self.bar_t + self.delta
        ledger = self.ledger
        no_fees = self._no_fees
        # without fees the ledger keeps no per-order accumulator (nothing to name or forget)
        result = ledger.fill(
            symbol,
            order.side,
            qty,
            price,
            order_id=None if no_fees else str(eid),
            fee=ZERO if no_fees else None,
        )
        prior = order.filled_qty
        filled = prior + qty
        avg = order.filled_avg_price
        order.filled_avg_price = price if avg is None else (avg * prior + price * qty) / filled
        order.filled_qty = filled
        order.updated_at = now
        self._exec_seq += 1
        exec_id = f"{symbol}:{self._exec_seq}"
        leaves = rec.leaves
        if self.risk is not None:
            self.risk.on_exec(
                ExecReport(
                    exec=ExecType.FILL,
                    seq=self._exec_seq,
                    order_id=order.id,
                    account_id=BACKTEST_ACCOUNT_ID,
                    symbol=symbol,
                    side=order.side,
                    t=now,
                    exec_id=exec_id,
                    price=price,
                    qty=qty,
                    cum_qty=filled,
                    leaves_qty=_dec(leaves) * inst.lot,
                )
            )
        if not leaves:
            order.status = OrderStatus.FILLED
            order.filled_at = now
            if order.qty is None:
                order.qty = filled
            self._close(eid, order)
            if not no_fees:
                ledger.forget_order(str(eid))
        else:
            order.status = OrderStatus.PARTIALLY_FILLED
        self.fills.append(
            FillRecord(
                t=now,
                symbol=symbol,
                side=order.side,
                qty=qty,
                price=price,
                fee=result.fee,
                order_id=order.id,
                execution_id=exec_id,
                liquidity=liquidity,
                position_qty=result.position.qty,
                realized_pl=result.realized_pl,
            )
        )
        self.fill_k.append(self.k)
        self.fill_cash.append(float(ledger.cash))
        if self._wants_updates:
            self.updates.append(
                TradeUpdate(
                    event="fill" if not leaves else "partial_fill",
                    order=order_to_alpaca(order),
                    timestamp=now,
                    price=price,
                    qty=qty,
                    execution_id=exec_id,
                    position_qty=result.position.qty,
                )
            )

    def _close(self, eid: int, order: Order) -> None:
        if self.open.pop(eid, None) is None:
            return
        self.working[order.symbol] -= 1
        if self.risk is not None and order.status is not OrderStatus.FILLED:
            self.risk.on_exec(
                ExecReport(
                    exec=ExecType.CANCELED,
                    seq=self._exec_seq,
                    order_id=order.id,
                    account_id=BACKTEST_ACCOUNT_ID,
                    symbol=order.symbol,
                    side=order.side,
                    t=self.now(),
                    reason=order.reason,
                )
            )

    def _update(self, event: str, order: Order) -> None:
        self.dirty = True
        if self._wants_updates:
            self.updates.append(TradeUpdate(event=event, order=order_to_alpaca(order), timestamp=self.now()))


class Backtester:
    """Run one strategy over bars. `run()` returns a RawResult; `papertrade.backtest.report` turns it
    into figures, tables and HTML."""

    def __init__(
        self,
        strategy: Strategy,
        data: Mapping[str, BarSeries] | Sequence[BarSeries],
        config: BacktestConfig | None = None,
    ) -> None:
        series = list(data.values()) if isinstance(data, Mapping) else list(data)
        if not series:
            raise ValidationError("symbols", "a backtest needs bars of at least one symbol")
        if len({s.interval for s in series}) != 1:
            raise ValidationError("interval", "every symbol's bars must have the same interval")
        if len({s.symbol for s in series}) != len(series):
            raise ValidationError("symbols", "each symbol's bars must come once")
        self.strategy = strategy
        self.series = {s.symbol: s for s in series}
        self.interval = series[0].interval
        self.config = config or BacktestConfig()
        self.ctx = BacktestContext(self.series, self.config)
        #: use the general replay loop even for one symbol (tests compare it with the lean one)
        self.general_loop = False
        self.driver = Driver(strategy, self.ctx, tuple(self.series), self.interval)
        self.ctx.bind(self.driver)

    def run(self, progress: Callable[[int], None] | None = None) -> RawResult:
        """Replay every bar (see the module docstring); the strategy's errors pause it and are reported."""
        started = time.perf_counter()
        symbols = list(self.series)
        order_sym, order_row, times = _merge(self.series)
        n = len(times)
        ctx = self.ctx
        driver = self.driver
        interval = self.interval
        step_ns = interval.seconds * 1_000_000_000
        cols = [_columns(self.series[s]) for s in symbols]
        for s, col in zip(symbols, cols, strict=True):
            ctx.closes[s] = col[4]
        cursor = ctx.cursor
        active = ctx.active
        liquidity = ctx.liquidity
        stale = ctx.stale
        expiry = _DayExpiry(self.config.hours, symbols, times[0], times[-1]) if n else None
        # DAY orders expire at the first session close in (previous bar, this bar]; only bars that
        # start with orders working can have any. `next_close` is the first close after the last
        # bar that looked (0: look again), so a bar before it cannot hold a close.
        next_close = 0
        open_orders = ctx.open
        on_bar = self.strategy.on_bar
        every_bar = self.config.liquidity.refresh_bars <= 1
        fast = every_bar and len(symbols) == 1 and not self.general_loop
        has_period = type(self.strategy).period is not None
        error: str | None = None
        tb: str | None = None
        gc_was_enabled = gc.isenabled()
        gc.disable()
        bars_seen = 0
        try:
            driver.start()
            ctx.settle()
            running = driver.state is State.RUNNING
            chunk = 1 << 14
            if fast:
                # one symbol, a re-quote at every bar: the lean loop (time and cursors derived from k)
                symbol = symbols[0]
                ts, o, h, lo_, c, v = cols[0]
                ctx.fast = (symbol, ts, c, times, step_ns)
                for lo in range(0, n, chunk):
                    hi = min(n, lo + chunk)
                    for k in range(lo, hi):
                        if open_orders and k and times[k] >= next_close:
                            cutoff = expiry.next_close(times[k - 1])  # type: ignore[union-attr]
                            next_close = expiry.next_close(times[k])  # type: ignore[union-attr]
                            if times[k] >= cutoff:
                                ctx.expire_day(cutoff)
                                ctx.settle()
                                running = driver.state is State.RUNNING
                        bar = Bar(
                            symbol=symbol,
                            interval=interval,
                            t=ts[k],
                            o=o[k],
                            h=h[k],
                            l=lo_[k],
                            c=c[k],
                            v=v[k],
                        )
                        ctx.k = k
                        if active:
                            ctx.requote(symbol, c[k])
                        if running:
                            bars_seen += 1
                            try:
                                on_bar(bar)
                            except Exception as exc:
                                driver._failed("on_bar", exc)
                                running = False
                            if has_period and running:
                                driver._maybe_periodic(ctx.now())
                            if ctx.dirty:
                                ctx.settle()
                                running = driver.state is State.RUNNING
                    if progress is not None:
                        progress(hi - lo)
                ctx.sync()
            else:
                chunk = 1 << 14
                for lo in range(0, n, chunk):
                    hi = min(n, lo + chunk)
                    for k in range(lo, hi):
                        t_ns = times[k]
                        if open_orders and k and t_ns >= next_close:
                            cutoff = expiry.next_close(times[k - 1])  # type: ignore[union-attr]
                            next_close = expiry.next_close(t_ns)  # type: ignore[union-attr]
                            if t_ns >= cutoff:
                                ctx.expire_day(cutoff)
                                ctx.settle()
                                running = driver.state is State.RUNNING
                        si = order_sym[k]
                        symbol = symbols[si]
                        row = order_row[k]
                        ts, o, h, lo_, c, v = cols[si]
                        close = c[row]
                        bar = Bar(
                            symbol=symbol,
                            interval=interval,
                            t=ts[row],
                            o=o[row],
                            h=h[row],
                            l=lo_[row],
                            c=close,
                            v=v[row],
                        )
                        cursor[symbol] = row + 1
                        ctx.bar_t = bar.t
                        ctx.k = k
                        ctx.t_ns = t_ns + step_ns
                        if every_bar or liquidity[symbol].due():
                            if symbol in active:
                                ctx.requote(symbol, close)
                            else:
                                stale[symbol] = close
                        if running:
                            bars_seen += 1
                            try:
                                on_bar(bar)
                            except Exception as exc:
                                driver._failed("on_bar", exc)
                                running = False
                            if has_period and running:
                                driver._maybe_periodic(ctx.now())
                            if ctx.dirty:
                                ctx.settle()
                                running = driver.state is State.RUNNING
                    if progress is not None:
                        progress(hi - lo)
            driver.bars_seen += bars_seen
            if driver.state is State.RUNNING:
                driver.stop()
                ctx.settle()
        except Exception as exc:  # a failure of the simulation itself, not of the strategy
            error = f"backtest failed: {type(exc).__name__}: {exc}"
            tb = traceback.format_exc()
        finally:
            if gc_was_enabled:
                gc.enable()
        if driver.last_error and error is None:
            error = driver.last_error
            tb = driver.last_traceback
        prices = ctx.marks()
        positions = {s: ctx.position(s) for s, p in ctx.ledger.positions.items() if p.qty}
        final_equity = ctx.ledger.cash + sum((p.qty * prices[s] for s, p in positions.items()), ZERO)
        equity, gross = _equity_curve(
            ctx, symbols, order_sym, [self.series[s] for s in symbols], float(self.config.cash)
        )
        elapsed = time.perf_counter() - started
        return RawResult(
            strategy=f"{type(self.strategy).__module__}:{type(self.strategy).__qualname__}",
            params=dict(self.strategy.p),
            symbols=tuple(symbols),
            interval=interval,
            start=_ns_dt(times[0]) if n else None,
            end=_ns_dt(times[-1] + step_ns) if n else None,
            starting_cash=self.config.cash,
            final_cash=ctx.ledger.cash,
            final_equity=final_equity,
            fees=ctx.ledger.fees,
            realized_pl=ctx.ledger.realized_pl,
            positions=positions,
            fills=ctx.fills,
            orders=list(ctx.orders.values()),
            equity_t=np.asarray(times, dtype=np.int64) + step_ns,
            equity=equity,
            exposure=gross,
            prices=self.series,
            bars=n,
            bars_seen=driver.bars_seen,
            orders_sent=driver.orders_sent,
            state=driver.state.value,
            error=error,
            traceback=tb,
            elapsed_s=elapsed,
        )


def _equity_curve(
    ctx: BacktestContext, symbols: list[str], order_sym: list[int], series: list[BarSeries], cash: float
) -> tuple[np.ndarray, np.ndarray]:
    """Equity and gross exposure at every merged bar, vectorised from the fills (floats for curves;
    the exact figures are the ledger's). A fill at bar k counts in bar k's mark."""
    n = len(order_sym)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    ks = np.asarray(ctx.fill_k, dtype=np.int64)
    equity = _steps(n, ks, np.asarray(ctx.fill_cash, dtype=np.float64), cash)
    gross = np.zeros(n)
    one = len(symbols) == 1
    sym = None if one else np.asarray(order_sym, dtype=np.int64)
    for si, symbol in enumerate(symbols):
        picked = range(len(ctx.fills)) if one else [i for i, f in enumerate(ctx.fills) if f.symbol == symbol]
        if not picked:
            continue
        # the float column the exact closes were read from (a float's shortest repr converts back to
        # the same float; + 0.0 turns a -0.0 into the 0.0 its Decimal "0" gives)
        closes = np.asarray(series[si].c, dtype=np.float64) + 0.0
        if sym is None:
            close = closes
        else:
            close = np.full(n, np.nan)
            close[sym == si] = closes
            close = _ffill(close)
        fills = ctx.fills
        qtys = np.asarray([float(fills[i].position_qty) for i in picked], dtype=np.float64)
        at = ks if one else ks[np.asarray(picked, dtype=np.int64)]
        mv = np.nan_to_num(_steps(n, at, qtys, 0.0) * close)
        equity += mv
        gross += np.abs(mv)
    return equity, gross


def _steps(n: int, at: np.ndarray, values: np.ndarray, initial: float) -> np.ndarray:
    """The step curve over `n` bars that is `initial` until bar `at[0]` and `values[i]` from bar
    `at[i]` on (`at` ascending; of several values at one bar the last wins)."""
    if not len(at):
        return np.full(n, initial)
    last = np.empty(len(at), dtype=bool)
    last[:-1] = at[1:] != at[:-1]
    last[-1] = True
    at = at[last]
    counts = np.diff(np.concatenate(([0], at, [n])))
    return np.repeat(np.concatenate(([initial], values[last])), counts)


def _ffill(a: np.ndarray) -> np.ndarray:
    idx = np.where(~np.isnan(a), np.arange(len(a)), 0)
    np.maximum.accumulate(idx, out=idx)
    return a[idx]


class _DayExpiry:
    """The session closes (NYSE; UTC midnights for 24/7 markets) at which DAY orders expire, computed
    for the whole run on first use: only bars that start with orders working need them, so a run
    whose orders never rest across a bar never loads the exchange calendar."""

    def __init__(self, hours: str, symbols: list[str], first_ns: int, last_ns: int) -> None:
        self.hours = hours
        self.symbols = symbols
        self.first_ns = first_ns
        self.last_ns = last_ns
        self._closes: list[int] | None = None

    @property
    def closes(self) -> list[int]:
        if self._closes is None:
            self._closes = self._compute()
        return self._closes

    def next_close(self, t_ns: int) -> int:
        """The first close strictly after the instant `t_ns` (far future when none is known)."""
        closes = self.closes
        i = bisect.bisect_right(closes, t_ns)
        return closes[i] if i < len(closes) else 1 << 62

    def _compute(self) -> list[int]:
        from papertrade import calendar

        day = 86_400 * 1_000_000_000
        if all(calendar.always_open(s, self.hours) for s in self.symbols):
            start = self.first_ns // day * day + day
            return list(range(start, self.last_ns + 2 * day, day))
        first = _ns_dt(self.first_ns).date() - timedelta(days=1)
        last = _ns_dt(self.last_ns).date() + timedelta(days=7)
        return [_dt_ns(c) for _, _, c in calendar.sessions(first, last)]


class _RiskAdapter:
    """The pure risk rules (`papertrade.risk.RiskEngine`, what the risk service runs) in process."""

    def __init__(self, limits: Any) -> None:
        from papertrade.risk import Limits, RiskEngine

        lim = limits if isinstance(limits, Limits) else Limits.model_validate(limits)
        self.engine = RiskEngine(lim)

    def check(self, ctx: BacktestContext, order: Order) -> tuple[str | None, Decimal | None]:
        """(reject reason or None, clipped qty or None)."""
        from papertrade.messages import RiskCheckRequest

        request = RiskCheckRequest(
            order_id=order.id,
            account_id=order.account_id,
            symbol=order.symbol,
            side=order.side,
            type=order.type,
            time_in_force=order.time_in_force,
            t=ctx.now(),
            qty=order.qty,
            notional=order.notional,
            limit_price=order.limit_price,
            stop_price=order.stop_price,
        )
        decision = self.engine.check(request, ctx.marks())
        if decision.decision == "reject":
            return f"risk: {decision.reason}", None
        if decision.decision == "clip" and decision.qty is not None:
            return None, decision.qty
        return None, None

    def on_exec(self, report: ExecReport) -> None:
        self.engine.on_exec(report)


_DEC_CACHE: dict[int, Decimal] = {}
_new_object = object.__new__
_set_attribute = object.__setattr__
_SAFE_UNKNOWN = SafeUUID.unknown


def _uuid(value: int) -> UUID:
    """`UUID(int=value)` for a value known to fit 128 bits, without the constructor's parsing."""
    u: UUID = _new_object(UUID)
    _set_attribute(u, "int", value)
    _set_attribute(u, "is_safe", _SAFE_UNKNOWN)
    return u


def _dec(n: int) -> Decimal:
    d = _DEC_CACHE.get(n)
    if d is None:
        d = _DEC_CACHE[n] = Decimal(n)
    return d


def _dt_ns(t: datetime) -> int:
    delta = t - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _ns_dt(ns: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(ns) // 1000)


def _columns(
    s: BarSeries,
) -> tuple[list[datetime], list[Decimal], list[Decimal], list[Decimal], list[Decimal], list[Decimal]]:
    """The series' columns as Python lists of datetimes and exact Decimals. Repeated values share one
    Decimal (converted once, through the float's shortest repr), so a million bars cost a few
    thousand conversions."""

    def conv(col: np.ndarray) -> list[Decimal]:
        if len(col) == 0:
            return []
        codes, uniq = pd.factorize(col)
        decs = np.empty(len(uniq), dtype=object)
        decs[:] = [to_decimal_str(x) for x in uniq.tolist()]
        out: list[Decimal] = decs[codes].tolist()
        return out

    ts = _datetimes(s.t, s.interval.seconds * 1_000_000_000)
    return ts, conv(s.o), conv(s.h), conv(s.l), conv(s.c), conv(s.v)


def _datetimes(t: np.ndarray, step_ns: int) -> list[datetime]:
    """Epoch ns as aware UTC datetimes; a run of consecutive bars costs one addition per bar."""
    out: list[datetime] = []
    if not len(t):
        return out
    step = timedelta(microseconds=step_ns // 1000)
    gaps = np.flatnonzero(np.diff(t) != step_ns) + 1
    starts = [0, *gaps.tolist(), len(t)]
    firsts = (t[starts[:-1]] // 1000).tolist()
    append = out.append
    for i, first in enumerate(firsts):
        dt = EPOCH + timedelta(microseconds=first)
        append(dt)
        for _ in range(starts[i + 1] - starts[i] - 1):
            dt = dt + step
            append(dt)
    return out


def _merge(series: Mapping[str, BarSeries]) -> tuple[list[int], list[int], list[int]]:
    """The replay order: by bar time, then by the symbols' order."""
    parts = list(series.values())
    if len(parts) == 1:
        n = len(parts[0])
        return [0] * n, list(range(n)), parts[0].t.tolist()
    t = np.concatenate([p.t for p in parts])
    sym = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)])
    row = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts])
    order = np.lexsort((sym, t))
    return sym[order].tolist(), row[order].tolist(), t[order].tolist()
