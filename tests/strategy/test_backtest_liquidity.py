"""The backtester's synthetic liquidity: the integer-tick ladder equals the orderbook's model, and the
lean replay (deferred ladders, partial placements) books the same fills as re-quoting every bar."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from papertrade.backtest import BacktestConfig, Backtester
from papertrade.backtest.liquidity import TickLadder
from papertrade.bars import generate
from papertrade.book.liquidity import LiquidityConfig, ladder
from papertrade.enums import Side
from papertrade.strategy.loader import build_strategy

CONFIGS = [
    LiquidityConfig(),
    LiquidityConfig(spread_bps=Decimal(7), step_bps=Decimal("2.5"), levels=8),
    LiquidityConfig(spread_bps=Decimal("0.3"), step_bps=Decimal(0), levels=4, size=Decimal(40)),
    LiquidityConfig(spread_bps=Decimal(30_000), step_bps=Decimal(1000), levels=3),
    LiquidityConfig(levels=6, size=Decimal(100), size_step=Decimal(-30)),
    LiquidityConfig(levels=3, size=Decimal("0.5"), size_step=Decimal("0.25")),
    LiquidityConfig(levels=0),
    LiquidityConfig(levels=1, spread_bps=Decimal(1), size=Decimal("0.0004")),
]
GRIDS = [
    (Decimal("0.01"), Decimal(1)),
    (Decimal("0.0001"), Decimal("0.001")),
    (Decimal(1), Decimal(10)),
    (Decimal("0.05"), Decimal(1)),  # not a power of ten: the model's own Decimal code
    (Decimal("0.25"), Decimal("0.5")),
]


def _refs(rng: random.Random) -> list[Decimal]:
    refs = [Decimal("0.01"), Decimal("0.03"), Decimal(1), Decimal("99.995"), Decimal(0), Decimal(-5)]
    refs += [Decimal(rng.randint(1, 2_000_000)) / 100 for _ in range(300)]
    refs += [Decimal(rng.randint(1, 10**9)) / 10 ** rng.randint(0, 8) for _ in range(300)]
    refs.append(Decimal("123.4567890123456789012345678"))  # too long to be exact: the fallback
    return refs


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("tick", "lot"), GRIDS)
def test_the_tick_ladder_gives_the_models_rungs(config: LiquidityConfig, tick: Decimal, lot: Decimal) -> None:
    fast = TickLadder(config, tick, lot)
    for ref in _refs(random.Random(7)):
        want = ladder(ref, config, tick, lot)
        got = fast.entries(ref)
        assert [(e[0], e[1], e[2]) for e in got] == [(r.side, r.price, r.qty) for r in want], ref
        for side, price, qty, eside, ticks, lots in got:
            assert eside == (0 if side is Side.BUY else 1)
            assert ticks * tick == price and lots * lot == qty


class _Eager(Backtester):
    """The backtester with the lean replay off: every symbol's maker re-quotes (`reconcile`) at every
    due bar and never leaves the book, so no ladder is deferred, withdrawn or partly placed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ctx.active = _Always(self.ctx.symbols)
        self.ctx._maybe_withdraw = lambda symbol: None  # type: ignore[method-assign]


class _Always(set[str]):
    """An `active` set that keeps every symbol."""

    def discard(self, value: str) -> None:
        pass


@pytest.mark.parametrize(
    ("entrypoint", "params"),
    [
        ("papertrade.samples.sma_cross:SmaCross", {"fast": 3, "slow": 8, "qty": 150}),
        ("papertrade.samples.mean_reversion:MeanReversion", {"window": 15, "k": 1.0}),
        ("papertrade.samples.breakout_stop:BreakoutStop", {"lookback": 10}),
        ("tests.strategy.strategies:ParityProbe", {}),
    ],
)
@pytest.mark.parametrize("general", [False, True])
def test_the_lean_replay_books_what_requoting_every_bar_books(
    entrypoint: str, params: dict[str, Any], general: bool
) -> None:
    data = [generate("AAPL", datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 7, tzinfo=UTC), seed=5)]
    outs = []
    for cls in (Backtester, _Eager):
        tester = cls(build_strategy(entrypoint, params), data, BacktestConfig(cash=Decimal(1_000_000)))
        tester.general_loop = general
        raw = tester.run()
        assert raw.error is None
        outs.append(
            (
                [(f.t, f.side, f.qty, f.price, f.order_id, f.liquidity) for f in raw.fills],
                [(o.id, o.status, o.filled_qty, o.filled_avg_price) for o in raw.orders],
                raw.final_cash,
                list(raw.equity),
            )
        )
    assert outs[0][0], "the strategy should trade"
    assert outs[0] == outs[1]


def test_a_lone_market_order_gets_only_the_rungs_it_can_reach_then_the_rest() -> None:
    from papertrade.backtest.liquidity import LiquiditySim, book_class
    from papertrade.book import engine as eng

    sim = LiquiditySim("AAPL", LiquidityConfig())  # 5 levels of 100 a side
    book = book_class()()
    sim.refresh(book, Decimal("100"), 0, only_side=eng.SELL, only_lots=150)
    book.take_events()
    assert [(r[0], r[1]) for r in sim.resting.values()] == [
        (Side.SELL, Decimal("100.05")),
        (Side.SELL, Decimal("100.10")),
    ]
    assert sim.half
    sim.complete(book, 0)
    book.take_events()
    want = ladder(Decimal("100"), LiquidityConfig(), Decimal("0.01"), Decimal(1))
    assert sorted((r[0], r[1], r[2]) for r in sim.resting.values()) == sorted(
        (r.side, r.price, r.qty) for r in want
    )
    assert not sim.half
