"""Streamer benchmark: as-fast-as-possible replay to NATS, and the synthetic generator.

    .venv/bin/python bench/bench_streamer.py [--days 120] [--runs 3] [--no-floor]

1. Synthetic history: 1,000,000 one-minute bars of one symbol (`@BTCUSD`, 24/7, ~694 days; and `AAPL`
   in NYSE regular hours, ~2,560 sessions), median of `--runs` warm runs (the first, cold run shown too).
   Target: < 1 s.
2. Replay as fast as possible: the streamer's own `Engine` (the code the service runs) replays the
   synthetic feed for 8 symbols and all six intervals over `--days` days, publishing one bar per
   message (core NATS publish on md.bar.<interval>.<symbol>, captured by the MD JetStream stream)
   while a subscriber in another process counts every `md.bar.>` message. Figures: publish rate
   (bars / wall time of the run, preparation included), subscriber rate (first..last message), and
   whether every bar arrived. Target: >= 150,000 bars/s, all received.
3. The floor in the same run: `/work/shared/bench/floors/bench_nats.py` core pub/sub with 150-byte
   pre-encoded bodies on the asyncio loop (its subscriber rate is the ~190,000 msg/s of FLOORS.md).

`BENCH_MD_STORAGE=memory` measures with the MD stream on memory storage instead of the project's
file storage (the stream is recreated). NATS: `NATS_URL` if set, else an embedded server (papertrade.stack.infra.Infra).
Writes bench/results/streamer.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FLOOR = (
    Path(os.environ.get("PT_FLOORS", HERE.parent.parent / "shared" / "bench" / "floors")) / "bench_nats.py"
)
SYMBOLS = ["AAPL", "MSFT", "SPY", "QQQ", "TSLA", "NVDA", "AMZN", "@BTCUSD"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="all", choices=["all", "sub"])
    ap.add_argument("--url", default=None)
    ap.add_argument("--days", type=int, default=120)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument(
        "--no-stream", action="store_true", help="also measure without the MD JetStream stream capturing"
    )
    a = ap.parse_args()
    if a.mode == "sub":
        asyncio.run(_subscriber(a.url))
        return
    url = a.url or os.environ.get("NATS_URL")
    if url:
        _run_all(url, a)
        return
    from papertrade.stack.infra import Infra

    with tempfile.TemporaryDirectory(prefix="bench-streamer-") as tmp, Infra(Path(tmp)) as ep:
        _run_all(ep.nats_url, a)


def _run_all(url: str, a: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    rows += _bench_synthetic(a.runs)
    replay = [asyncio.run(_bench_replay(url, a.days)) for _ in range(a.runs)]
    bare = (
        [asyncio.run(_bench_replay(url, a.days, stream=False)) for _ in range(a.runs)] if a.no_stream else []
    )
    best = max(replay, key=lambda r: r["sub_rate"])
    floor = None if a.no_floor else _floor(url, a.runs)
    pub = statistics.median(r["pub_rate"] for r in replay)
    sub = statistics.median(r["sub_rate"] for r in replay)
    all_received = all(r["received"] == r["published"] for r in replay)
    rows.append(
        _row("replay publish rate (bars/s, median)", pub, "bars/s", floor["pub_rate"] if floor else None)
    )
    rows.append(
        _row(
            "replay received by subscriber (bars/s, median)",
            sub,
            "bars/s",
            floor["sub_rate"] if floor else None,
        )
    )
    if bare:
        rows.append(
            _row(
                "replay without the MD stream capturing: received (bars/s, median)",
                statistics.median(r["sub_rate"] for r in bare),
                "bars/s",
                floor["sub_rate"] if floor else None,
            )
        )
    rows.append(_row("replay bars published per run", best["published"], "bars", None))
    rows.append(
        _row(
            "replay runs where every bar arrived",
            sum(r["received"] == r["published"] for r in replay),
            f"of {len(replay)}",
            None,
        )
    )
    _print(rows, replay, floor, all_received)
    out = HERE / "results" / "streamer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {out}")


def _bench_synthetic(runs: int) -> list[dict[str, Any]]:
    from papertrade.bars.synthetic import _session_table, generate

    _session_table()  # the NYSE calendar is built once per process (~1 s), not per call: keep it out
    rows = []
    start = datetime(2022, 1, 3, tzinfo=UTC)
    for symbol, days, label in (("@BTCUSD", 694.44, "24/7"), ("AAPL", 3750, "regular hours")):
        end = start + timedelta(days=days)
        times = []
        n = 0
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            s = generate(
                symbol,
                start - timedelta(days=days if label != "24/7" else 0),
                end if label == "24/7" else start,
            )
            times.append(time.perf_counter() - t0)
            n = len(s)
        rows.append(
            _row(
                f"synthetic {n:,} x 1m bars, {symbol} ({label}), warm median",
                statistics.median(times[1:]),
                "s",
                1.0,
                lower_is_better=True,
            )
        )
        rows.append(
            _row(
                f"synthetic {n:,} x 1m bars, {symbol} ({label}), cold first run",
                times[0],
                "s",
                1.0,
                lower_is_better=True,
            )
        )
    return rows


async def _bench_replay(url: str, days: int, stream: bool = True) -> dict[str, Any]:
    import nats

    from papertrade.bars.series import dt_to_ns
    from papertrade.bus.streams import MD_STREAM, ensure_streams
    from papertrade.enums import Interval
    from papertrade_streamer.engine import Engine, RunSpec, Watchlist
    from papertrade_streamer.feeds import SyntheticFeed

    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    if stream:
        config = _md_stream()
        info = None
        try:
            info = await nc.jetstream().stream_info(str(config.name))
        except Exception:
            pass
        if info is not None and info.config.storage != config.storage:
            await nc.jetstream().delete_stream(str(config.name))
        await ensure_streams(nc.jetstream(), (config,))
    else:
        try:
            await nc.jetstream().delete_stream(str(MD_STREAM.name))
        except Exception:
            pass
    sub = _spawn_subscriber(url)
    try:
        line = sub.stdout.readline().strip() if sub.stdout else ""
        if line != "READY":
            raise SystemExit(f"subscriber failed to start: {line!r}")
        engine = Engine(
            SyntheticFeed(seed=7), Watchlist(list(SYMBOLS), list(Interval)), "regular", chunk_days=20
        )
        engine.nats = lambda: nc
        start = datetime(2024, 1, 2, tzinfo=UTC)
        spec = RunSpec("replay", dt_to_ns(start), dt_to_ns(start + timedelta(days=days)))
        t0 = time.perf_counter()
        engine.start_run(spec)
        await engine.wait()
        await nc.flush(timeout=60)
        wall = time.perf_counter() - t0
        if engine.status != "finished":
            raise SystemExit(f"replay ended {engine.status}: {engine.error}")
        await nc.publish("md.bench.end", b"END")
        await nc.flush()
        out, _ = await asyncio.to_thread(sub.communicate, timeout=300)
    finally:
        if sub.poll() is None:
            sub.kill()
        await nc.close()
    r = json.loads(out.strip().splitlines()[-1])
    return {
        "published": engine.published,
        "pub_rate": engine.published / wall,
        "sub_rate": r["rate"],
        "received": r["received"],
        "wall": wall,
    }


def _spawn_subscriber(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "sub", "--url", url], stdout=subprocess.PIPE, text=True
    )


async def _subscriber(url: str) -> None:
    import nats

    nc = await nats.connect(url)
    st = {"n": 0, "first": 0.0, "last": 0.0}
    done = asyncio.Event()

    async def on_bar(msg: Any) -> None:
        now = time.perf_counter()
        if not st["n"]:
            st["first"] = now
        st["last"] = now
        st["n"] += 1

    async def on_end(msg: Any) -> None:
        done.set()

    await nc.subscribe("md.bar.>", cb=on_bar, pending_msgs_limit=5_000_000, pending_bytes_limit=2 * 1024**3)
    await nc.subscribe("md.bench.end", cb=on_end)
    await nc.flush()
    print("READY", flush=True)
    try:
        await asyncio.wait_for(done.wait(), timeout=600)
    except TimeoutError:
        pass
    await nc.close()
    n = int(st["n"])
    span = st["last"] - st["first"]
    print(json.dumps({"received": n, "rate": (n - 1) / span if n > 1 and span > 0 else 0.0}), flush=True)


def _floor(url: str, runs: int) -> dict[str, float] | None:
    if not FLOOR.is_file():
        print(f"(no floor script at {FLOOR})")
        return None
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as fh:
        path = fh.name
    try:
        subprocess.run(
            [
                sys.executable,
                str(FLOOR),
                "all",
                "--url",
                url,
                "--parts",
                "core",
                "--codecs",
                "bytes",
                "--loops",
                "asyncio",
                "--runs",
                str(runs),
                "--json",
                path,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        recs = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    finally:
        os.unlink(path)
    recs = [r for r in recs if r.get("case") == "core_pubsub"]
    return {
        "pub_rate": statistics.median(r["pub_rate"] for r in recs),
        "sub_rate": statistics.median(r["sub_rate"] for r in recs),
    }


def _row(
    figure: str, value: float, unit: str, compare: float | None, lower_is_better: bool = False
) -> dict[str, Any]:
    ratio = None
    if compare:
        ratio = round(compare / value if lower_is_better else value / compare, 3)
    return {
        "figure": figure,
        "value": round(value, 4),
        "unit": unit,
        "compare": round(compare, 4) if compare else compare,
        "ratio": ratio,
    }


def _print(
    rows: list[dict[str, Any]], replay: list[dict[str, Any]], floor: dict[str, float] | None, ok: bool
) -> None:
    print(f"{'figure':<62} {'value':>14} {'unit':<8} {'compare':>12} {'ratio':>7}")
    for r in rows:
        cmp = "" if r["compare"] is None else f"{r['compare']:,.3f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['figure']:<62} {r['value']:>14,.3f} {r['unit']:<8} {cmp:>12} {ratio:>7}")
    print("\nreplay runs:")
    for r in replay:
        print(
            f"  published {r['published']:,} in {r['wall']:.2f}s: {r['pub_rate']:,.0f} bars/s; subscriber {r['received']:,} at {r['sub_rate']:,.0f}/s"
        )
    if floor:
        print(
            f"floor (nats-py core pub/sub, pre-encoded, asyncio): publish {floor['pub_rate']:,.0f}/s, subscriber {floor['sub_rate']:,.0f}/s"
        )
    print(
        "compare: synthetic rows against the 1 s target (ratio > 1 = faster); replay rows against the floor"
    )
    if not ok:
        print("WARNING: some bars did not reach the subscriber")


def _md_stream() -> Any:
    from papertrade.bus.streams import MD_STREAM

    if os.environ.get("BENCH_MD_STORAGE") == "memory":
        import dataclasses

        from nats.js.api import StorageType

        return dataclasses.replace(MD_STREAM, storage=StorageType.MEMORY)
    return MD_STREAM


if __name__ == "__main__":
    main()
