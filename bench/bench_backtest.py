"""Backtest speed: SMA(10)/SMA(30) crossover over 1,000,000 one-minute bars, ours vs backtrader.

    .venv/bin/python bench/bench_backtest.py [--bars 1000000] [--runs 3] [--bt-runs 1]

- Bars: the floor's seeded GBM (/work/shared/bench/floors/bench_backtest.py `gbm`: seed 42, mu 5%,
  sigma 20%, 390 bars a day, consecutive minutes from 2020-01-02 09:30, no calendar), with prices
  rounded to the cent (an exchange trades on a tick grid) and high/low widened to contain open and
  close. backtrader gets exactly these bars.
- Ours: `papertrade.backtest.Backtester` with the shipped `SmaCross` sample (fast 10, slow 30, 100
  shares: buy when flat and crossing up, sell the position when crossing down), every order through
  the broker checks, the real matching engine (`papertrade.book.engine.Book`) against the orderbook's
  synthetic liquidity model (`papertrade.book.liquidity`; its ladder in integer ticks where that is
  exact, `papertrade.backtest.liquidity.TickLadder`), and the real ledger
  (`papertrade.ledger.Ledger`); bars/s = bars / `run()` (which includes turning the numpy columns
  into `Bar` structs with exact Decimals). Best of `--runs` and median, wall and CPU time (on a
  shared machine the wall figures follow the other processes' load; compare same-run ratios).
- backtrader: the same strategy (`bt.ind.CrossOver(SMA10, SMA30)`, buy 100 / close), Cerebro's
  defaults (runonce, preload), cash 10,000,000, in a fresh process, timed around `cerebro.run()`.
- Floor: the pure-Python incremental SMA crossover loop of FLOORS.md (no broker, no fills).

Writes bench/results/backtest.json: [{"figure", "value", "unit", "compare", "ratio"}].
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FLOORS = Path("/work/shared/bench/floors")
if not FLOORS.is_dir():
    FLOORS = HERE.parents[1] / "shared" / "bench" / "floors"
sys.path.insert(0, str(FLOORS))

import numpy as np  # noqa: E402


def _floor_module() -> Any:
    """The floor script (same file name as this one, so loaded under another name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("floor_bench_backtest", FLOORS / "bench_backtest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASH = 10_000_000


def bars(n: int) -> tuple[np.ndarray, ...]:
    """The floor's GBM bars, on the cent grid, with a valid OHLC."""
    ts, o, h, lo, c, v = _floor_module().gbm(n)
    o = np.round(o, 2)
    c = np.round(c, 2)
    h = np.maximum(np.round(h, 2), np.maximum(o, c))
    lo = np.minimum(np.round(lo, 2), np.minimum(o, c))
    return ts, o, h, lo, c, v


def ours(n: int) -> dict[str, Any]:
    from papertrade.backtest import BacktestConfig, Backtester
    from papertrade.bars.series import BarSeries
    from papertrade.enums import Interval
    from papertrade.samples.sma_cross import SmaCross

    ts, o, h, lo, c, v = bars(n)
    series = BarSeries("SYM", Interval.M1, ts.astype("datetime64[ns]").astype(np.int64), o, h, lo, c, v)
    gc.collect()
    tester = Backtester(
        SmaCross({"fast": 10, "slow": 30, "qty": 100}), [series], BacktestConfig(cash=Decimal(CASH))
    )
    cpu0 = time.process_time()
    raw = tester.run()
    cpu = time.process_time() - cpu0
    assert raw.error is None, raw.error
    return {
        "bars": n,
        "wall_s": raw.elapsed_s,
        "cpu_s": cpu,
        "orders": raw.orders_sent,
        "fills": len(raw.fills),
        "final_equity": str(raw.final_equity),
    }


def backtrader_once(n: int) -> dict[str, Any]:
    import backtrader as bt
    import pandas as pd

    ts, o, h, lo, c, v = bars(n)
    df = pd.DataFrame(
        {"open": o, "high": h, "low": lo, "close": c, "volume": v, "openinterest": 0.0},
        index=pd.DatetimeIndex(ts),
    )

    class SmaCross(bt.Strategy):  # type: ignore[misc]
        params = {"fast": 10, "slow": 30}

        def __init__(self) -> None:
            self.cross = bt.ind.CrossOver(bt.ind.SMA(period=self.p.fast), bt.ind.SMA(period=self.p.slow))
            self.filled = 0

        def notify_order(self, order: Any) -> None:
            if order.status == order.Completed:
                self.filled += 1

        def next(self) -> None:
            if not self.position:
                if self.cross > 0:
                    self.buy(size=100)
            elif self.cross < 0:
                self.close()

    cerebro = bt.Cerebro(runonce=True, preload=True)
    cerebro.adddata(bt.feeds.PandasData(dataname=df))
    cerebro.addstrategy(SmaCross)
    cerebro.broker.setcash(float(CASH))
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    strat = cerebro.run()[0]
    return {
        "bars": n,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - cpu0,
        "orders": strat.filled,
        "final_value": round(cerebro.broker.getvalue(), 2),
        "backtrader": bt.__version__,
    }


def floor_loop(n: int) -> float:
    _, _, _, _, c, _ = bars(n)
    rows = [(0, 0.0, 0.0, 0.0, x, 0.0) for x in c.tolist()]
    s = _floor_module().PySmaCross()
    t0 = time.perf_counter()
    for row in rows:
        s.on_bar(row)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="all", choices=["all", "bt", "ours"])
    ap.add_argument("--bars", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bt-runs", type=int, default=1)
    a = ap.parse_args()
    if a.mode == "bt":
        print(json.dumps(backtrader_once(a.bars)))
        return
    if a.mode == "ours":
        print(json.dumps(ours(a.bars)))
        return

    runs = [_subprocess("ours", a.bars) for _ in range(a.runs)]
    bt_runs = [_subprocess("bt", a.bars) for _ in range(a.bt_runs)]
    floor = floor_loop(a.bars)

    best = max(runs, key=lambda r: a.bars / r["wall_s"])
    ours_wall = a.bars / best["wall_s"]
    ours_cpu = max(a.bars / r["cpu_s"] for r in runs)
    cpu_median = statistics.median(a.bars / r["cpu_s"] for r in runs)
    median = statistics.median(a.bars / r["wall_s"] for r in runs)
    bt_best = max(bt_runs, key=lambda r: a.bars / r["wall_s"])
    bt_wall = a.bars / bt_best["wall_s"]
    bt_cpu = max(a.bars / r["cpu_s"] for r in bt_runs)
    figures = [
        {
            "figure": "backtest SMA crossover, 1m bars/s (wall, best)",
            "value": round(ours_wall),
            "unit": "bars/s",
            "compare": "target 300,000",
            "ratio": round(ours_wall / 300_000, 3),
        },
        {
            "figure": "backtest SMA crossover, 1m bars/s (wall, median)",
            "value": round(median),
            "unit": "bars/s",
            "compare": "target 300,000",
            "ratio": round(median / 300_000, 3),
        },
        {
            "figure": "backtest SMA crossover, bars/s (CPU time)",
            "value": round(ours_cpu),
            "unit": "bars/s",
            "compare": "target 300,000",
            "ratio": round(ours_cpu / 300_000, 3),
        },
        {
            # on a shared machine wall time follows the neighbours' load; CPU time much less so
            "figure": "backtest SMA crossover, bars/s (CPU time, median)",
            "value": round(cpu_median),
            "unit": "bars/s",
            "compare": "target 300,000",
            "ratio": round(cpu_median / 300_000, 3),
        },
        {
            "figure": "backtrader same bars and strategy, bars/s (wall)",
            "value": round(bt_wall),
            "unit": "bars/s",
            "compare": "ours / backtrader (target 20x)",
            "ratio": round(ours_wall / bt_wall, 2),
        },
        {
            "figure": "backtrader, bars/s (CPU time)",
            "value": round(bt_cpu),
            "unit": "bars/s",
            "compare": "ours / backtrader, CPU time",
            "ratio": round(ours_cpu / bt_cpu, 2),
        },
        {
            "figure": "floor: pure-Python SMA crossover loop, no broker",
            "value": round(floor),
            "unit": "bars/s",
            "compare": "ours / floor",
            "ratio": round(ours_wall / floor, 3),
        },
        {
            "figure": "orders filled: ours / backtrader",
            "value": best["fills"],
            "unit": "fills",
            "compare": f"backtrader {bt_best['orders']}",
            "ratio": round(best["fills"] / max(bt_best["orders"], 1), 3),
        },
    ]
    print(f"bars: {a.bars:,}  (load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
    width = max(len(f["figure"]) for f in figures)
    for f in figures:
        print(f"{f['figure']:<{width}}  {f['value']:>12,} {f['unit']:<7} {f['compare']:<32} {f['ratio']}")
    print(
        f"ours: {len(runs)} runs, wall {[round(a.bars / r['wall_s']) for r in runs]}, "
        f"CPU {[round(a.bars / r['cpu_s']) for r in runs]}; final equity {best['final_equity']}"
    )
    print(f"backtrader {bt_best.get('backtrader')}: final value {bt_best['final_value']}")
    out = HERE / "results" / "backtest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")


def _subprocess(mode: str, n: int) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), mode, "--bars", str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(p.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
