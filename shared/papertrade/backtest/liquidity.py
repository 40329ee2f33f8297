"""The synthetic liquidity of a backtest: the orderbook's model, applied to the in-process book.

The model (which ladder of orders to keep resting around the latest bar's close, and which resting
orders to keep, cancel or place) is `papertrade.book.liquidity` (`ladder`, `reconcile`): the code the
orderbook service runs. This module applies it to a `papertrade.book.engine.Book` as the service does
on every `refresh_bars`-th bar of a symbol: cancels first, then the new rungs, best first, as the
liquidity account.

Lean replay: a refresh only touches the book when it can matter to the strategy. While the strategy
has no order in that book and every rung is whole, the ladder after any number of refreshes is exactly
the target of the latest refresh, so the backtester defers it (`stale`) until the strategy sends an
order there; otherwise (orders working, or a rung partly taken) it refreshes at every due bar. A lone
market order into a deferred ladder can only reach the best rungs of the other side that hold its
size, so only those are placed before it; the rest of the target follows right after it if the ladder
stays (a rung partly taken), before anything else can reach the book.

The target itself is `ladder`'s, computed in integer ticks where that is exact (`TickLadder`).
`tests/strategy/test_backtest_liquidity.py` checks both against the model and against a replay that
re-quotes at every bar.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal, getcontext
from typing import Any

from papertrade.book import engine as eng
from papertrade.book.liquidity import LiquidityConfig, Rung, ladder, reconcile
from papertrade.enums import Side
from papertrade.instruments import instrument

#: The liquidity account's tag inside the backtester's books (the service uses LIQUIDITY_ACCOUNT_ID).
LIQUIDITY_TAG = 2

__all__ = ["LiquidityConfig", "LiquiditySim", "TickLadder", "book_class"]

#: a target rung: (side, price, qty, engine side, price in ticks, lots)
Entry = tuple[Side, Decimal, Decimal, int, int, int]


def book_class() -> Any:
    """The matching engine's `Book`: the compiled build when it is current (the same source, see
    `papertrade.book.native`), else the pure-Python one; the orderbook service picks it the same way."""
    global _BOOK
    if _BOOK is None:
        from papertrade.book.native import native_book

        _BOOK = native_book() or eng.Book
    return _BOOK


_BOOK: Any = None


class LiquiditySim:
    """One symbol's synthetic market maker in a backtest."""

    def __init__(self, symbol: str, config: LiquidityConfig, enabled: bool = True) -> None:
        self.symbol = symbol
        self.config = config
        self.enabled = enabled
        inst = instrument(symbol)
        self.tick = inst.tick
        self.lot = inst.lot
        #: the maker's resting orders: id -> [side, price, open qty, tick, open lots, placed lots]
        self.resting: dict[Any, list[Any]] = {}
        self.partial = False
        self.half = False
        self.last_ref: Decimal | None = None
        self.bars = 0
        self._seq = 0
        self._ladder = TickLadder(config, self.tick, self.lot)
        self._cache: dict[Decimal, tuple[list[Entry], int, list[Rung]]] = {}
        #: the rungs of the latest target that a partial placement left out (while `half`)
        self._unplaced: list[Entry] = []

    def due(self) -> bool:
        """Count a bar of this symbol; True if the model re-quotes on it (every `refresh_bars`-th bar,
        the first one included)."""
        due = self.bars % max(self.config.refresh_bars, 1) == 0
        self.bars += 1
        return due

    def withdraw(self, book: Any) -> Any:
        """Take every rung off the book while nothing of the strategy's can meet them (the next
        refresh places the whole target again). Returns the book to use from now on: a fresh one
        that remembers the last trade price (what stops trigger on)."""
        self.half = False
        self._unplaced = []
        if not self.resting:
            return book
        fresh = book_class()()
        fresh.last_tick = book.last_tick
        self.resting.clear()
        return fresh

    def complete(self, book: Any, t_ns: int) -> None:
        """After a partial placement: rest the rungs of the same target it left out (in the target's
        order, as a full placement would have)."""
        if not self.half or self.last_ref is None:
            return
        self.half = False
        unplaced = self._unplaced
        self._unplaced = []
        seq = self._seq
        resting = self.resting
        limit = book.limit
        for side, price, qty, eside, tick, lots in unplaced:
            seq += 1
            resting[-seq] = [side, price, qty, tick, lots, lots]
            limit(-seq, eside, tick, lots, LIQUIDITY_TAG, eng.GTC, eng.STP_NONE, t_ns)
        self._seq = seq

    def refresh(
        self, book: Any, ref: Decimal, t_ns: int, only_side: int | None = None, only_lots: int = 0
    ) -> None:
        """Re-quote around `ref` (engine events stay in `book.events`). `only_side`: when nothing
        rests, place that side's rungs only, best first, and (`only_lots` > 0) only as many as hold
        `only_lots` lots: all that a lone market order of that size can reach. `complete` adds the
        others if they come to matter."""
        if not self.enabled:
            return
        self.last_ref = ref
        target, bids, rungs = self._target(ref)
        resting = self.resting
        if not resting:
            if only_side is None:
                chosen = target
                unplaced = []
            else:
                # the side's rungs, best first: target[lo:hi] (the ladder lists bids, then asks)
                lo, hi = (0, bids) if only_side == eng.BUY else (bids, len(target))
                end = lo
                need = only_lots if only_lots > 0 else -1
                while end < hi and need != 0:
                    need = max(need - target[end][5], 0) if need > 0 else need
                    end += 1
                chosen = target[lo:end]
                unplaced = target[:lo] + target[end:]
            seq = self._seq
            limit = book.limit
            for side, price, qty, eside, tick, lots in chosen:
                seq += 1
                resting[-seq] = [side, price, qty, tick, lots, lots]
                limit(-seq, eside, tick, lots, LIQUIDITY_TAG, eng.GTC, eng.STP_NONE, t_ns)
            self._seq = seq
            self._unplaced = unplaced
            self.half = bool(unplaced)
            self.partial = False
            return
        self._unplaced = []
        self.half = False
        if not rungs:
            rungs.extend(Rung(e[0], e[1], e[2]) for e in target)
        cancels, places = reconcile(
            [(oid, r[0], r[1], r[2]) for oid, r in resting.items()],
            rungs,
            self.config.min_fill_ratio,
        )
        for oid in cancels:
            book.cancel(oid, "liquidity refresh", LIQUIDITY_TAG)
            del resting[oid]
        if places:
            wanted = {id(r) for r in places}
            for rung, (side, price, qty, eside, tick, lots) in zip(rungs, target, strict=True):
                if id(rung) in wanted:
                    self._seq += 1
                    oid = -self._seq
                    resting[oid] = [side, price, qty, tick, lots, lots]
                    book.limit(oid, eside, tick, lots, LIQUIDITY_TAG, eng.GTC, eng.STP_NONE, t_ns)
        self.partial = any(r[4] < r[5] for r in resting.values())

    def filled(self, oid: Any, lots: int, leaves: int) -> bool:
        """One of the maker's orders traded `lots`; `leaves` lots remain open. True if a rung is now
        partly taken (the maker then re-quotes at every due bar until it is whole again)."""
        rec = self.resting.get(oid)
        if rec is None:
            return False
        if leaves <= 0:
            del self.resting[oid]
            return False
        rec[2] = Decimal(leaves) * self.lot
        rec[4] = leaves
        self.partial = True
        return True

    def _target(self, ref: Decimal) -> tuple[list[Entry], int, list[Rung]]:
        """The model's ladder around `ref` (`TickLadder`): its rungs as entries, how many of them
        (the first ones) are bids, and the `Rung`s themselves (filled in when `reconcile` needs them)."""
        hit = self._cache.get(ref)
        if hit is None:
            entries = self._ladder.entries(ref)
            hit = (entries, sum(1 for e in entries if e[3] == eng.BUY), [])
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[ref] = hit
        return hit


class TickLadder:
    """`papertrade.book.liquidity.ladder` for one config, tick and lot, computed in integer ticks.

    `ladder` prices level i at `ref * (1 -/+ off_i)` rounded down/up to the tick, in Decimals. The
    factors `1 -/+ off_i` and the sizes do not depend on `ref`, so they are computed once, by the
    same Decimal expressions. When the tick is a power of ten and `ref * factor` fits the decimal
    context's precision, every Decimal step of `ladder` is exact, so the floor/ceiling of the exact
    ratio in integers is the same price, and the level adjustments (a tick apart at least) are the
    same integer steps. Otherwise (any other tick, a long `ref`, a non-finite one) it calls
    `ladder` itself.
    """

    def __init__(self, config: LiquidityConfig, tick: Decimal, lot: Decimal) -> None:
        self.config = config
        self.tick = tick
        self.lot = lot
        self.exact = tick.is_finite() and lot.is_finite() and tick > 0 and lot > 0 and _power_of_ten(tick)
        self.levels: list[tuple[int, int, int, int, Decimal, int]] = []
        self.digits = 0
        if not self.exact:
            return
        tn, td = tick.as_integer_ratio()
        half = config.spread_bps / 2
        for i in range(config.levels):
            off = (half + config.step_bps * i) / _BPS
            down = 1 - off
            up = 1 + off
            qty = (config.size + config.size_step * i) / lot
            qty = qty.to_integral_value(rounding=ROUND_FLOOR) * lot
            dn, dd = down.as_integer_ratio()
            un, ud = up.as_integer_ratio()
            lots = int(qty / lot)
            self.levels.append((dn * td, dd * tn, un * td, ud * tn, qty, lots))
            self.digits = max(self.digits, len(down.as_tuple().digits), len(up.as_tuple().digits))

    def entries(self, ref: Decimal) -> list[Entry]:
        """The rungs `ladder(ref, ...)` gives: bids best first, then asks best first."""
        cfg = self.config
        if (
            not self.exact
            or not ref.is_finite()
            or len(ref.as_tuple().digits) + self.digits > getcontext().prec
        ):
            return [self._entry(r) for r in ladder(ref, cfg, self.tick, self.lot)]
        if ref <= 0 or cfg.levels <= 0 or cfg.size <= 0:
            return []
        rn, rd = ref.as_integer_ratio()
        tick = self.tick
        buy, sell = Side.BUY, Side.SELL
        bids: list[Entry] = []
        asks: list[Entry] = []
        prev_bid: int | None = None
        prev_ask: int | None = None
        for i, (dn, dd, un, ud, qty, lots) in enumerate(self.levels):
            # floor / ceiling of ref * factor / tick, exactly
            bid = rn * dn // (rd * dd)
            ask = -(-rn * un // (rd * ud))
            if prev_bid is not None and bid >= prev_bid:
                bid = prev_bid - 1
            if prev_ask is not None and ask <= prev_ask:
                ask = prev_ask + 1
            if i == 0 and ask <= bid:
                ask = bid + 1
            if qty <= 0:
                continue
            if bid > 0:
                bids.append((buy, bid * tick, qty, eng.BUY, bid, lots))
            asks.append((sell, ask * tick, qty, eng.SELL, ask, lots))
            prev_bid, prev_ask = bid, ask
        return bids + asks

    def _entry(self, r: Rung) -> Entry:
        return (
            r.side,
            r.price,
            r.qty,
            eng.BUY if r.side is Side.BUY else eng.SELL,
            int(r.price / self.tick),
            int(r.qty / self.lot),
        )


_BPS = Decimal(10_000)


def _power_of_ten(x: Decimal) -> bool:
    n, d = x.as_integer_ratio()
    v = d if n == 1 else n if d == 1 else 0
    text = str(v)
    return text[0] == "1" and text.strip("0") == "1"
