"""The synthetic market maker, pure: from the latest bar and a config, the ladder of orders to keep.

    cfg = LiquidityConfig(spread_bps=Decimal(10), levels=5, size=Decimal(100), step_bps=Decimal(5))
    target = ladder(Decimal("100"), cfg, tick=Decimal("0.01"), lot=Decimal("1"))
    cancels, places = reconcile(resting, target)   # resting: the maker's open orders (side, price, qty)

The ladder is symmetric around the reference price (the bar's close): level i (0 = best) of the bids
sits at ref * (1 - (spread/2 + i*step) / 10^4) rounded down to the tick, the asks at the mirror
price rounded up, every level at least one tick from the previous. `reconcile` keeps the orders
that already match a rung with enough quantity and names what to cancel and what to place, so a
bar that does not move the price sends no commands at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from papertrade.enums import Side

_BPS = Decimal(10_000)


@dataclass(frozen=True)
class LiquidityConfig:
    """spread_bps: best bid to best ask distance; step_bps: distance between levels; size: qty per
    level (size_step adds that much more per level further out); refresh_bars: re-quote every N bars;
    min_fill_ratio: a rung filled below that share of `size` is re-placed."""

    spread_bps: Decimal = Decimal(10)
    levels: int = 5
    size: Decimal = Decimal(100)
    step_bps: Decimal = Decimal(5)
    size_step: Decimal = Decimal(0)
    refresh_bars: int = 1
    min_fill_ratio: Decimal = Decimal("0.5")


@dataclass(frozen=True)
class Rung:
    side: Side
    price: Decimal
    qty: Decimal


def ladder(ref: Decimal, cfg: LiquidityConfig, tick: Decimal, lot: Decimal) -> list[Rung]:
    """The rungs to keep around `ref`: bids best first, then asks best first. Empty if ref <= 0."""
    if ref <= 0 or cfg.levels <= 0 or cfg.size <= 0:
        return []
    bids: list[Rung] = []
    asks: list[Rung] = []
    half = cfg.spread_bps / 2
    prev_bid: Decimal | None = None
    prev_ask: Decimal | None = None
    for i in range(cfg.levels):
        off = (half + cfg.step_bps * i) / _BPS
        bid = _to_grid(ref * (1 - off), tick, ROUND_FLOOR)
        ask = _to_grid(ref * (1 + off), tick, ROUND_CEILING)
        if prev_bid is not None and bid >= prev_bid:
            bid = prev_bid - tick
        if prev_ask is not None and ask <= prev_ask:
            ask = prev_ask + tick
        if i == 0 and ask <= bid:
            ask = bid + tick
        qty = _to_grid(cfg.size + cfg.size_step * i, lot, ROUND_FLOOR)
        if qty <= 0:
            continue
        if bid > 0:
            bids.append(Rung(Side.BUY, bid, qty))
        asks.append(Rung(Side.SELL, ask, qty))
        prev_bid, prev_ask = bid, ask
    return bids + asks


def reconcile(
    resting: Iterable[tuple[Any, Side, Decimal, Decimal]],
    target: Sequence[Rung],
    min_fill_ratio: Decimal = Decimal("0.5"),
) -> tuple[list[Any], list[Rung]]:
    """(ids to cancel, rungs to place) to go from the maker's `resting` orders to `target`.

    `resting` holds (order id, side, price, open qty). An order stays if it sits on a target rung
    and still has at least `min_fill_ratio` of the rung's qty; every other order is canceled and
    every uncovered rung placed. Deterministic: the output follows the input orders.
    """
    wanted = {(r.side, r.price): r for r in target}
    covered: set[tuple[Side, Decimal]] = set()
    cancels: list[Any] = []
    for oid, side, price, qty in resting:
        rung = wanted.get((side, price))
        if rung is None or (side, price) in covered or qty < rung.qty * min_fill_ratio:
            cancels.append(oid)
        else:
            covered.add((side, price))
    places = [r for r in target if (r.side, r.price) not in covered]
    return cancels, places


def _to_grid(value: Decimal, step: Decimal, rounding: str) -> Decimal:
    return (value / step).to_integral_value(rounding=rounding) * step
