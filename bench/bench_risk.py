"""Risk checks over NATS request/reply against one real risk process, next to a trivial responder.

    .venv/bin/python bench/bench_risk.py [--runs 5] [--n 5000] [--seconds 5] [--clients 2]
        [--inflight 128] [--shared-nats]

Starts a private nats-server (other processes answering `risk.check` on a shared server, e.g. other
test runs, would answer the benchmark's requests too); `--shared-nats` uses NATS_URL instead. Uses
DATABASE_URL / REDIS_URL when set, else starts embedded servers in a temp dir. Starts one risk
process (`python -m papertrade_risk`) and one trivial responder process (replies a fixed body, the
floor of `/work/shared/bench/floors/bench_nats.py`), both on uvloop. Then:

- latency: `--runs` rounds of `--n` sequential requests each, alternating blocks of 1,000 between
  risk and the floor so both see the same machine; per round p50 / p99 of each and the ratios, and
  the median ratio over the rounds (target: within 1.3x).
- throughput: `--clients` requester processes with `--inflight` concurrent requests each, for
  `--seconds`, against risk, then against the floor (target: >= 10,000 checks/s for one replica).

`compare --build old=/tmp/old/services/risk --build new=services/risk` measures builds side by side
instead (latency only): each build's risk process (its directory first on PYTHONPATH, e.g. a `git
archive` of an older commit) on a private nats-server with its own trivial responder, blocks of
requests alternating over all of them, so a difference between builds is not the machine's load
changing between two runs. It also prints each build's CPU per check (risk process, its Redis when
embedded) beside its trivial responder's CPU per request, read from /proc over the rounds: steadier
than a tail latency on a shared machine.

Checks are real: 200 accounts with limits on every rule (qty, notional, position, gross exposure,
daily loss, rate, collar, symbols), a mark in Redis, orders that pass; each approval reserves open
exposure in the owning replica's memory, written behind to Redis (`RISK_FLUSH`; the env is passed
on, so `RISK_FLUSH=0.005 bench/bench_risk.py` measures another interval). Prints a table and writes
bench/results/risk.json.
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
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
from _rows import interpreter

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "risk.json"
FLOOR_SUBJECT = "bench.risk.floor"
SYMBOL = "BENCH"
ACCOUNTS = 200
FLOOR_REPLY = b'{"decision":"approve","qty":null,"notional":null,"reason":null,"rule":null,"throttled":false}'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "compare", "responder", "load"])
    ap.add_argument("--build", action="append", default=[], help="compare: LABEL=services/risk directory")
    ap.add_argument("--url", default="")
    ap.add_argument("--subject", default="")
    ap.add_argument("--runs", type=int, default=5, help="latency rounds (the ratios' median is reported)")
    ap.add_argument("--n", type=int, default=5_000, help="sequential requests per target and round")
    ap.add_argument("--shared-nats", action="store_true", help="use NATS_URL instead of a private server")
    ap.add_argument("--seconds", type=float, default=5.0, help="throughput run length per target")
    ap.add_argument("--clients", type=int, default=2, help="requester processes for throughput")
    ap.add_argument("--inflight", type=int, default=128, help="concurrent requests per requester")
    a = ap.parse_args()
    _uvloop()
    if a.mode == "responder":
        asyncio.run(_responder(a.url))
    elif a.mode == "load":
        print(json.dumps(asyncio.run(_load(a.url, a.subject, a.seconds, a.inflight))), flush=True)
    elif a.mode == "compare":
        compare(a)
    else:
        run(a)


def run(a: argparse.Namespace) -> None:
    from papertrade.stack.infra import Infra
    from papertrade.stack.launch import service_env, service_url, start_service, wait_ready
    from papertrade.stack.procs import free_port
    from papertrade.stack.services import spec

    infra_env = dict(os.environ)
    if not a.shared_nats:
        infra_env.pop("NATS_URL", None)
    with (
        tempfile.TemporaryDirectory(prefix="bench-risk-") as tmp,
        Infra(Path(tmp) / "infra", env=infra_env) as ep,
    ):
        s = spec("risk")
        env = service_env(
            s,
            {**ep.env(), "PAPERTRADE_ADMIN_TOKEN": "bench", "LOG_LEVEL": "WARNING"},
            {"risk": free_port()},
        )
        risk = start_service(s, env, Path(tmp) / "logs")
        floor = subprocess.Popen(
            [sys.executable, __file__, "responder", "--url", ep.nats_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            url = service_url(s, env)
            wait_ready(risk, url)
            assert floor.stdout is not None and floor.stdout.readline().strip() == "READY"
            accounts = asyncio.run(_setup(url, ep.redis_url))
            load_before = os.getloadavg()[0]
            lat = asyncio.run(_latency(ep.nats_url, accounts, a.n, a.runs))
            thr_risk = _throughput(ep.nats_url, "risk.check", a)
            thr_floor = _throughput(ep.nats_url, FLOOR_SUBJECT, a)
            decisions = asyncio.run(_decision_counts(url))
        finally:
            risk.stop()
            if floor.stdin is not None:
                floor.stdin.close()
            try:
                floor.wait(10)
            except subprocess.TimeoutExpired:
                floor.kill()
    _report(lat, thr_risk, thr_floor, decisions, a, load_before)


def compare(a: argparse.Namespace) -> None:
    from contextlib import ExitStack

    from papertrade.stack.infra import Infra
    from papertrade.stack.launch import service_env, service_url, start_service, wait_ready
    from papertrade.stack.procs import free_port
    from papertrade.stack.services import spec

    builds = dict(b.split("=", 1) for b in a.build)
    if not builds:
        raise SystemExit("compare needs --build LABEL=DIR at least once")
    infra_env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    s = spec("risk")
    with tempfile.TemporaryDirectory(prefix="bench-risk-") as tmp, ExitStack() as stack:
        targets: list[tuple[str, str, str, str, str]] = []  # label, nats url, subject, risk url, redis url
        pids: dict[str, int | None] = {}  # CPU of each build's processes over the rounds
        for label, path in builds.items():
            infra = Infra(Path(tmp) / label, env=infra_env)
            ep = stack.enter_context(infra)
            pids[f"{label} redis"] = infra.procs["redis"].pid if "redis" in infra.procs else None
            env = service_env(
                s,
                {**ep.env(), "PAPERTRADE_ADMIN_TOKEN": "bench", "LOG_LEVEL": "WARNING",
                 "PYTHONPATH": str(Path(path).resolve())},
                {"risk": free_port()},
            )  # fmt: skip
            risk = start_service(s, env, Path(tmp) / f"logs-{label}")
            stack.callback(risk.stop)
            floor = subprocess.Popen(
                [sys.executable, __file__, "responder", "--url", ep.nats_url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            stack.callback(_stop_responder, floor)
            url = service_url(s, env)
            pids[label], pids[f"{label} floor"] = risk.pid, floor.pid
            wait_ready(risk, url)
            assert floor.stdout is not None and floor.stdout.readline().strip() == "READY"
            targets += [
                (label, ep.nats_url, "risk.check", url, ep.redis_url),
                (f"{label} floor", ep.nats_url, FLOOR_SUBJECT, url, ep.redis_url),
            ]
        load_before = os.getloadavg()[0]
        cpu_before = {k: _cpu_seconds(pid) for k, pid in pids.items()}
        rounds = asyncio.run(_compare_latency(targets, a.n, a.runs))
        cpu = {k: _cpu_seconds(pid) - cpu_before[k] for k, pid in pids.items()}
    print(
        f"\n{a.runs} rounds of {a.n} sequential requests per target, blocks of 500 alternating over all targets"
    )
    print(f"{'target':<24} {'p50 ms':>8} {'p99 ms':>8}   (medians over rounds)")
    med = {
        label: (statistics.median(_pct(r[label], 50) for r in rounds), statistics.median(_pct(r[label], 99) for r in rounds))
        for label in rounds[0]
    }  # fmt: skip
    for label, (p50, p99) in med.items():
        print(f"{label:<24} {p50:>8.3f} {p99:>8.3f}")
    for label in builds:
        r50 = statistics.median(_pct(r[label], 50) / _pct(r[f"{label} floor"], 50) for r in rounds)
        r99 = statistics.median(_pct(r[label], 99) / _pct(r[f"{label} floor"], 99) for r in rounds)
        print(f"{label:<24} ratio to its floor (median of rounds): p50 {r50:.2f}  p99 {r99:.2f}")
    # CPU per request is steadier than a tail on a shared machine: what each check costs the process
    # (and Redis) against what the trivial responder costs, over the same number of requests
    count = (1000 + a.n * a.runs) / 1000
    for label in builds:
        own, floor_cpu = cpu[label] / count, cpu[f"{label} floor"] / count
        redis_cpu = (
            f"; its Redis {cpu[f'{label} redis'] / count * 1000:.0f} us" if pids[f"{label} redis"] else ""
        )
        print(
            f"{label:<24} CPU per check {own * 1000:.0f} us, trivial responder {floor_cpu * 1000:.0f} us "
            f"({own / floor_cpu:.2f}x){redis_cpu}"
        )
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")


async def _compare_latency(
    targets: list[tuple[str, str, str, str, str]], n: int, runs: int
) -> list[dict[str, list[float]]]:
    import nats

    conns: dict[str, Any] = {}
    bodies: dict[str, list[bytes]] = {}
    for _, nats_url, _, risk_url, redis_url in targets:
        if nats_url not in conns:
            conns[nats_url] = await nats.connect(nats_url)
            # each build its own accounts (builds may share one Redis)
            bodies[nats_url] = _bodies(await _setup(risk_url, redis_url), 1000 + n * runs)
    for _, nats_url, subject, _, _ in targets:
        for body in bodies[nats_url][:1000]:
            await conns[nats_url].request(subject, body, timeout=5)
    block = 500
    rounds = []
    for r in range(runs):
        samples: dict[str, list[float]] = {t[0]: [] for t in targets}
        first = 1000 + r * n
        for start in range(first, first + n, block):
            for label, nats_url, subject, _, _ in targets:
                nc, out = conns[nats_url], samples[label]
                for body in bodies[nats_url][start : min(start + block, first + n)]:
                    t0 = time.perf_counter_ns()
                    await nc.request(subject, body, timeout=5)
                    out.append((time.perf_counter_ns() - t0) / 1e6)
        rounds.append(samples)
        print(
            f"round {r + 1}: "
            + "  ".join(f"{k} {_pct(v, 50):.3f}/{_pct(v, 99):.3f}" for k, v in samples.items()),
            flush=True,
        )
    for nc in conns.values():
        await nc.close()
    return rounds


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a live process; 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def _stop_responder(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- setup ------------------------------------------------------------------------------------------


async def _setup(url: str, redis_url: str) -> list[str]:
    import httpx
    import orjson
    from redis.asyncio import Redis

    from papertrade import keys

    redis = Redis.from_url(redis_url)
    await redis.set(
        keys.last_trade(SYMBOL), orjson.dumps({"price": "100", "t": datetime.now(UTC).isoformat()})
    )
    await redis.aclose()
    limits = {
        "max_order_qty": 1000,
        "max_order_notional": "1000000",
        "max_position_qty": "100000000",
        "max_gross_exposure": "100000000000",
        "max_daily_loss": "1000000",
        "max_orders_per_second": 1000000,
        "price_collar_pct": 10,
        "blocked_symbols": ["NOPE"],
        "trading_hours": "any",
    }
    accounts = [str(uuid.uuid4()) for _ in range(ACCOUNTS)]
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": "Bearer bench"}, timeout=30
    ) as client:
        for acct in accounts:
            r = await client.put(f"/v1/limits/{acct}", json=limits)
            r.raise_for_status()
    return accounts


def _bodies(accounts: list[str], n: int) -> list[bytes]:
    from papertrade import codec
    from papertrade.enums import OrderType, Side, TimeInForce
    from papertrade.messages import RiskCheckRequest

    now = datetime.now(UTC)
    out = []
    for i in range(n):
        req = RiskCheckRequest(
            order_id=uuid.uuid4(),
            account_id=uuid.UUID(accounts[i % len(accounts)]),
            symbol=SYMBOL,
            side=Side.BUY if i % 2 else Side.SELL,
            type=OrderType.LIMIT,
            time_in_force=TimeInForce.DAY,
            t=now,
            qty=Decimal(1 + i % 50),
            limit_price=Decimal("100.05"),
        )
        out.append(codec.encode(req))
    return out


# --- latency -----------------------------------------------------------------------------------------


async def _latency(nats_url: str, accounts: list[str], n: int, runs: int) -> list[dict[str, list[float]]]:
    import nats

    nc = await nats.connect(nats_url)
    bodies = _bodies(accounts, 1000 + n * runs)
    # warm-up: every account cached, both paths hot
    for body in bodies[:1000]:
        await nc.request("risk.check", body, timeout=5)
        await nc.request(FLOOR_SUBJECT, body, timeout=5)
    block = 1000
    rounds = []
    for r in range(runs):
        samples: dict[str, list[float]] = {"risk": [], "floor": []}
        first = 1000 + r * n
        for start in range(first, first + n, block):
            for target, subject in (("risk", "risk.check"), ("floor", FLOOR_SUBJECT)):
                out = samples[target]
                for body in bodies[start : min(start + block, first + n)]:
                    t0 = time.perf_counter_ns()
                    await nc.request(subject, body, timeout=5)
                    out.append((time.perf_counter_ns() - t0) / 1e6)
        rounds.append(samples)
    await nc.close()
    return rounds


# --- throughput ----------------------------------------------------------------------------------------


def _throughput(nats_url: str, subject: str, a: argparse.Namespace) -> dict[str, float]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "load",
                "--url",
                nats_url,
                "--subject",
                subject,
                "--seconds",
                str(a.seconds),
                "--inflight",
                str(a.inflight),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(a.clients)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=a.seconds * 10 + 120)
        results.append(json.loads(out.strip().splitlines()[-1]))
    done = sum(r["done"] for r in results)
    errors = sum(r["errors"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"rate": done / span, "done": done, "errors": errors}


async def _load(nats_url: str, subject: str, seconds: float, inflight: int) -> dict[str, Any]:
    import nats

    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)
    accounts = [str(uuid.uuid4()) for _ in range(50)]  # fresh accounts: no limits, real checks
    bodies = _bodies(accounts, 4096)
    # warm-up
    await asyncio.gather(*(nc.request(subject, bodies[i], timeout=10) for i in range(256)))
    state = {"done": 0, "errors": 0}
    start = time.time()
    end_at = time.monotonic() + seconds

    async def worker(k: int) -> None:
        i = k
        while time.monotonic() < end_at:
            try:
                await nc.request(subject, bodies[i & 4095], timeout=10)
                state["done"] += 1
            except Exception:
                state["errors"] += 1
            i += inflight

    await asyncio.gather(*(worker(k) for k in range(inflight)))
    end = time.time()
    await nc.close()
    return {"done": state["done"], "errors": state["errors"], "start": start, "end": end}


async def _responder(nats_url: str) -> None:
    import nats

    nc = await nats.connect(nats_url)

    async def cb(msg: Any) -> None:
        await msg.respond(FLOOR_REPLY)

    await nc.subscribe(FLOOR_SUBJECT, cb=cb)
    await nc.flush()
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.close()


async def _decision_counts(url: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        text = (await client.get(f"{url}/metrics")).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("papertrade_risk_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels[len("papertrade_risk_decisions_total") :]] = float(value)
    return counts


# --- report -------------------------------------------------------------------------------------------


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def _report(
    rounds: list[dict[str, list[float]]],
    thr_risk: dict[str, float],
    thr_floor: dict[str, float],
    decisions: dict[str, Any],
    a: argparse.Namespace,
    load_before: float,
) -> None:
    per_round = []
    print(f"\nlatency rounds ({a.n} sequential requests per target each, alternating blocks of 1,000):")
    print(
        f"{'round':>5} {'risk p50':>9} {'floor p50':>9} {'ratio':>6} {'risk p99':>9} {'floor p99':>9} {'ratio':>6}"
    )
    for i, lat in enumerate(rounds, 1):
        r50, r99 = _pct(lat["risk"], 50), _pct(lat["risk"], 99)
        f50, f99 = _pct(lat["floor"], 50), _pct(lat["floor"], 99)
        per_round.append((r50, f50, r50 / f50, r99, f99, r99 / f99))
        print(f"{i:>5} {r50:>9.3f} {f50:>9.3f} {r50 / f50:>6.2f} {r99:>9.3f} {f99:>9.3f} {r99 / f99:>6.2f}")
    med = [statistics.median(row[k] for row in per_round) for k in range(6)]
    seq_rate = 1000 / statistics.fmean(x for lat in rounds for x in lat["risk"])
    rows = [
        {"figure": f"risk.check p50 (sequential, median of {len(rounds)} rounds)", "value": round(med[0], 3),
         "unit": "ms", "compare": f"trivial responder {med[1]:.3f} ms", "ratio": round(med[2], 2)},
        {"figure": f"risk.check p99 (sequential, median of {len(rounds)} rounds)", "value": round(med[3], 3),
         "unit": "ms", "compare": f"trivial responder {med[4]:.3f} ms", "ratio": round(med[5], 2)},
        {"figure": "risk.check sequential rate", "value": round(seq_rate), "unit": "checks/s",
         "compare": "one requester", "ratio": None},
        {"figure": f"risk.check throughput ({a.clients}x{a.inflight} in flight)", "value": round(thr_risk["rate"]),
         "unit": "checks/s", "compare": f"trivial responder {thr_floor['rate']:.0f}/s; target 10000",
         "ratio": round(thr_risk["rate"] / thr_floor["rate"], 2)},
    ]  # fmt: skip
    print()
    print(f"{'figure':<56} {'value':>10} {'unit':<9} {'compare':<45} {'ratio':>6}")
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{row['figure']:<56} {row['value']:>10} {row['unit']:<9} {row['compare']:<45} {ratio:>6}")
    print(
        f"\nthroughput errors: risk {thr_risk['errors']}, floor {thr_floor['errors']}; decisions: {decisions}"
    )
    print(
        f"load average (1 min) before / after the run: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        "(2 vCPU; compare ratios within one run)"
    )
    print(f"interpreter: {interpreter()}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


def _uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


if __name__ == "__main__":
    main()
