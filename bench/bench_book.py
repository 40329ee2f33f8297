"""Benchmark of the matching engine against the shared baseline book, in the same run.

    .venv/bin/python bench/bench_book.py [--runs 5] [--n 200000] [--rss-orders 1000000] [--dormant-stops N]

- Workload: /work/shared/bench/workload.py `generate()` (200,000 seeded ops: 60% passive limits,
  25% aggressive limits, 10% market, 5% cancels), prices converted to integer ticks once for both.
- Baseline: /work/shared/bench/baseline_book.py (limit/market/cancel only, no events).
- Ours: `papertrade.book.engine.Book`, the full engine (stops, STP, FOK/AON, replace paths all
  in), producing its events (accepted, one fill per maker, canceled remainders), which a consumer
  drains every 100 ops; every order carries an account and self-trade prevention `cancel_newest`
  (checked at every fill; the account is the order's own id so it never fires and the final book
  stays comparable). Measured twice: compiled with mypyc (`python -m papertrade.book.build`, what
  `make install` builds and `OrderBook` uses when present) and as pure Python (the same source).
- Also: the same ops as `NewOrderCmd`/`CancelCmd` through `OrderBook.apply` (decimal validation and
  conversion of every event into `ExecReport`s): the cost of the whole pure path the service runs.
- Every book must end in the workload's `final_depth`. Runs alternate baseline / engines; each
  figure is the median of `--runs`, and each ratio the median of the per-run ratios (engine and
  baseline measured back to back in the same run, so both saw about the same machine load).
- GC: Python's default collector settings, the same for both engines (the generated workload, and
  its 100-op chunks for the engines, are built first and `gc.freeze()`d so that neither book pays
  for scanning them: unfrozen, the 2,000 chunk lists cost the engines ~10% in their first GC passes).
- Each run is timed by the wall clock and by the process CPU time: on a shared, busy machine the CPU
  time is the steadier figure (other processes' load shows up as wall time only).
- RSS: a subprocess per engine rests 1,000,000 orders (passive, 2,000 price levels per side) and
  reports its peak RSS (VmHWM), imports included.

Writes bench/results/book.json: [{"figure", "value", "unit", "compare", "ratio"}].
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from statistics import median
from typing import Any
from uuid import UUID

HERE = Path(__file__).resolve().parent
SHARED_BENCH = Path("/work/shared/bench")
if not SHARED_BENCH.is_dir():
    SHARED_BENCH = HERE.parents[1] / "shared" / "bench"
sys.path.insert(0, str(SHARED_BENCH))

from baseline_book import Book as BaselineBook  # noqa: E402
from workload import generate  # noqa: E402

from papertrade.book import OrderBook  # noqa: E402
from papertrade.book.engine import BUY, CANCEL_NEWEST, GTC, STOP, STP_NONE, Book  # noqa: E402
from papertrade.book.native import native_book  # noqa: E402
from papertrade.enums import OrderType, Side, TimeInForce  # noqa: E402
from papertrade.messages import CancelCmd, NewOrderCmd  # noqa: E402

Op = tuple[Any, ...]
#: the engines' consumer drains the events every this many ops
DRAIN_EVERY = 100
#: the engines measured: the same source, compiled with mypyc (when built) and pure Python
ENGINES: dict[str, Any] = {}
if native_book() is not None:
    ENGINES["compiled"] = native_book()
ENGINES["pure-Python"] = Book


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--rss-orders", type=int, default=1_000_000)
    parser.add_argument(
        "--dormant-stops",
        type=int,
        default=0,
        help="stops the engines hold (never triggered) during the workload",
    )
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="compiled", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child, ENGINES[args.engine])
        return

    ops, final = generate(args.n, 42)
    ticks = [(o[0], o[1], o[2], round(o[3] * 100), o[4]) if o[0] == "L" else o for o in ops]
    chunks = [ticks[i : i + DRAIN_EVERY] for i in range(0, len(ticks), DRAIN_EVERY)]
    commands = _commands(ops)
    gc.collect()
    gc.freeze()  # the workload itself is not what the collectors should be scanning
    if "compiled" not in ENGINES:
        print("the compiled engine is not built (python -m papertrade.book.build): pure-Python only")

    runs = _runs(ticks, chunks, final, args.runs, args.dormant_stops)
    base = runs.pop("baseline")
    bw, bc = median(r[0] for r in base), median(r[1] for r in base)
    rows: list[tuple[str, float, str, str | None, float | None]] = [
        ("baseline book (wall clock)", bw, "ops/s", None, None),
        ("baseline book (process CPU time)", bc, "ops/s", None, None),
    ]
    for name, rates in runs.items():
        w, c = median(r[0] for r in rates), median(r[1] for r in rates)
        rw = median(r[0] / b[0] for r, b in zip(rates, base, strict=True))
        rc = median(r[1] / b[1] for r, b in zip(rates, base, strict=True))
        stops = f", {args.dormant_stops:,} dormant stops" if args.dormant_stops else ""
        rows.append((f"{name} engine, events + STP on{stops} (wall clock)", w, "ops/s", "baseline", rw))
        rows.append((f"{name} engine, events + STP on{stops} (process CPU time)", c, "ops/s", "baseline", rc))
    cmd_rates = [_run_commands(commands, final) for _ in range(max(2, args.runs // 2))]
    rows.append(
        (
            "OrderBook.apply: commands -> ExecReports, decimal path (wall)",
            median(cmd_rates),
            "ops/s",
            "baseline",
            median(cmd_rates) / bw,
        )
    )
    for name in ENGINES:
        rss = _rss(args.rss_orders, name)
        rows.append(
            (f"peak RSS, {args.rss_orders:,} resting orders ({name})", rss, "MB", "500 MB target", rss / 500)
        )

    print(
        f"\n{len(ticks):,} ops, median of {args.runs} runs (ratios: median of same-run ratios); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"{'figure':<64} {'value':>12} {'unit':<6} {'ratio':>7}")
    results: list[dict[str, Any]] = []
    for figure, value, unit, compare, ratio in rows:
        r = f"{ratio:.2f}x" if ratio is not None else ""
        print(f"{figure:<64} {value:>12,.0f} {unit:<6} {r:>7}")
        results.append(
            {
                "figure": figure,
                "value": round(value, 1),
                "unit": unit,
                "compare": compare,
                "ratio": None if ratio is None else round(ratio, 3),
            }
        )
    out = HERE / "results" / "book.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


Rates = tuple[float, float]


def _runs(
    ticks: list[Op], chunks: list[list[Op]], final: dict[str, Any], runs: int, stops: int = 0
) -> dict[str, list[Rates]]:
    """Alternate the baseline and each engine, `runs` times; (wall ops/s, CPU ops/s) of each run.
    The engines hold `stops` dormant stops."""
    out: dict[str, list[Rates]] = {"baseline": [], **{name: [] for name in ENGINES}}
    for i in range(runs):
        out["baseline"].append(_run_baseline(ticks, final))
        for name, cls in ENGINES.items():
            out[name].append(_run_engine(chunks, final, cls, stops))
        print(
            f"  run {i + 1}: "
            + "   ".join(f"{k} {v[-1][0]:>10,.0f} ops/s (cpu {v[-1][1]:>10,.0f})" for k, v in out.items())
        )
    return out


def _run_baseline(ops: list[Op], final: dict[str, Any]) -> Rates:
    book = BaselineBook()
    limit, market, cancel = book.limit, book.market, book.cancel
    t0 = time.perf_counter()
    c0 = time.process_time()
    for op in ops:
        kind = op[0]
        if kind == "L":
            limit(op[1], op[2], op[3], op[4])
        elif kind == "M":
            market(op[1], op[2], op[3])
        else:
            cancel(op[1])
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    assert book.depth() == final, "the baseline did not end in final_depth"
    return len(ops) / elapsed, len(ops) / cpu


def _run_engine(chunks: list[list[Op]], final: dict[str, Any], cls: Any, stops: int = 0) -> Rates:
    """One engine, all features on: every order carries an account (its own id, so the final book
    stays comparable with the baseline's) and self-trade prevention `cancel_newest`, checked at every
    fill; the events are produced and drained every `DRAIN_EVERY` ops, as the service's consumer does.
    `stops` dormant stops (buys far above every price, sells at the lowest tick) rest meanwhile."""
    book = cls()
    for i in range(stops):
        side = i % 2
        book.submit(
            f"stop-{i}", side, STOP, 1, None, 10**9 if side == BUY else 1, GTC, False, STP_NONE, "stops"
        )
    book.events.clear()
    limit, market, cancel = book.limit, book.market, book.cancel
    events = book.events
    n = sum(len(chunk) for chunk in chunks)
    drained = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    for chunk in chunks:
        for op in chunk:
            kind = op[0]
            if kind == "L":
                limit(op[1], op[2], op[3], op[4], op[1], GTC, CANCEL_NEWEST)
            elif kind == "M":
                market(op[1], op[2], op[3], op[1], GTC, CANCEL_NEWEST)
            else:
                cancel(op[1])
        drained += len(events)
        events.clear()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    assert drained > n, "no events?"
    assert book.depth() == final, "the engine did not end in final_depth"
    return n / elapsed, n / cpu


def _commands(ops: list[Op]) -> list[Any]:
    t = datetime(2024, 1, 2, 15, tzinfo=UTC)
    acct = UUID(int=7)
    sides = (Side.BUY, Side.SELL)
    out: list[Any] = []
    for op in ops:
        if op[0] == "C":
            out.append(CancelCmd(order_id=UUID(int=op[1]), account_id=acct, symbol="BENCH", t=t))
            continue
        out.append(
            NewOrderCmd(
                order_id=UUID(int=op[1]),
                account_id=acct,
                symbol="BENCH",
                side=sides[op[2]],
                type=OrderType.LIMIT if op[0] == "L" else OrderType.MARKET,
                time_in_force=TimeInForce.GTC,
                t=t,
                qty=Decimal(op[4] if op[0] == "L" else op[3]),
                limit_price=Decimal(f"{op[3]:.2f}") if op[0] == "L" else None,
            )
        )
    return out


def _run_commands(commands: list[Any], final: dict[str, Any]) -> float:
    book = OrderBook("BENCH")
    apply = book.apply
    t0 = time.perf_counter()
    reports = 0
    for cmd in commands:
        reports += len(apply(cmd))
    book.take_prints()
    elapsed = time.perf_counter() - t0
    assert book.core.depth() == final, "the command path did not end in final_depth"
    print(f"  OrderBook.apply: {len(commands) / elapsed:,.0f} commands/s, {reports / elapsed:,.0f} reports/s")
    return len(commands) / elapsed


def _rss(n: int, engine: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(n), "--engine", engine],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _rss_child(n: int, cls: Any) -> None:
    before = _vm("VmRSS")
    book = cls()
    per_side = n // 2
    for i in range(per_side):
        level = i % 2000
        book.limit(2 * i + 1, 0, 100_000 - 1 - level, 1 + i % 100, None, 1)
        book.limit(2 * i + 2, 1, 100_000 + level, 1 + i % 100, None, 1)
        if i % 1000 == 0:
            book.events.clear()
    book.events.clear()
    assert book.resting_count == 2 * per_side
    print(f"rss before the book {before:.0f} MB")
    print(_vm("VmHWM"))


def _vm(field: str) -> float:
    """VmHWM / VmRSS of this process in MB (/proc: getrusage's maxrss survives exec, VmHWM does not)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
