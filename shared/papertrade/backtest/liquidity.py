"""The synthetic liquidity of a backtest: the orderbook's model, applied to the in-process book.

The model (which ladder of orders to keep resting around the latest bar's close, and which resting
orders to keep, cancel or place) is `papertrade.book.liquidity` (`ladder`, `reconcile`): the code the
orderbook service runs. This module applies it to a `papertrade.book.engine.Book` as the service does
on every `refresh_bars`-th bar of a symbol: cancels first, then the new rungs, best first, as the
liquidity account.

Lean replay: a refresh only touches the book when it can matter to the strategy. While the strategy
has no order in that book and every rung is whole, the ladder after any number of refreshes is exactly
the target of the latest refresh, so the backtester defers it (`stale`) until the strategy sends an
order there; otherwise (orders working, or a rung partly taken) it refreshes at every due bar.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from papertrade.book import engine as eng
from papertrade.book.liquidity import LiquidityConfig, Rung, ladder, reconcile
from papertrade.enums import Side
from papertrade.instruments import instrument

#: The liquidity account's tag inside the backtester's books (the service uses LIQUIDITY_ACCOUNT_ID).
LIQUIDITY_TAG = 2

__all__ = ["LiquidityConfig", "LiquiditySim", "book_class"]


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
        self._cache: dict[Decimal, list[tuple[Rung, int, int, int]]] = {}
        #: the rungs of the latest target that a partial placement left out (while `half`)
        self._unplaced: list[tuple[Rung, int, int, int]] = []

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
        for rung, side, tick, lots in unplaced:
            seq += 1
            resting[-seq] = [rung.side, rung.price, rung.qty, tick, lots, lots]
            limit(-seq, side, tick, lots, LIQUIDITY_TAG, eng.GTC, eng.STP_NONE, t_ns)
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
        target = self._target(ref)
        resting = self.resting
        if not resting:
            seq = self._seq
            limit = book.limit
            unplaced: list[tuple[Rung, int, int, int]] = []
            need = only_lots if only_lots > 0 else -1
            for entry in target:
                rung, side, tick, lots = entry
                if only_side is not None and (side != only_side or need == 0):
                    unplaced.append(entry)
                    continue
                seq += 1
                resting[-seq] = [rung.side, rung.price, rung.qty, tick, lots, lots]
                limit(-seq, side, tick, lots, LIQUIDITY_TAG, eng.GTC, eng.STP_NONE, t_ns)
                if need > 0:
                    need = max(need - lots, 0)
            self._seq = seq
            self._unplaced = unplaced
            self.half = bool(unplaced)
            self.partial = False
            return
        self._unplaced = []
        self.half = False
        cancels, places = reconcile(
            [(oid, r[0], r[1], r[2]) for oid, r in resting.items()],
            [t[0] for t in target],
            self.config.min_fill_ratio,
        )
        for oid in cancels:
            book.cancel(oid, "liquidity refresh", LIQUIDITY_TAG)
            del resting[oid]
        if places:
            wanted = {id(r) for r in places}
            for rung, side, tick, lots in target:
                if id(rung) in wanted:
                    self._seq += 1
                    oid = -self._seq
                    resting[oid] = [rung.side, rung.price, rung.qty, tick, lots, lots]
                    book.limit(oid, side, tick, lots, LIQUIDITY_TAG, eng.GTC, eng.STP_NONE, t_ns)
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

    def _target(self, ref: Decimal) -> list[tuple[Rung, int, int, int]]:
        hit = self._cache.get(ref)
        if hit is None:
            rungs = ladder(ref, self.config, self.tick, self.lot)
            hit = [
                (
                    r,
                    eng.BUY if r.side is Side.BUY else eng.SELL,
                    int(r.price / self.tick),
                    int(r.qty / self.lot),
                )
                for r in rungs
            ]
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[ref] = hit
        return hit
