"""The orderbook service process on NATS: commands/s and CPU per command, end to end.

    .venv/bin/python bench/bench_orderbook_service.py [--runs 3] [--n 20000] [--rate 1000]

Method. An embedded NATS (JetStream) and Redis of this bench alone (the service's streams and its Redis
snapshot key are shared by every orderbook on a server: a private pair keeps other processes' commands
and replays out of the figures; Postgres is not needed), and the real orderbook process started with
`papertrade.stack.launch` (synthetic liquidity off, quotes on: the default, snapshots every 5,000
commands: the default). Each run uses a new symbol: it opens the book with an `OpenBookCmd`, then
publishes `--n` seeded commands on `ex.cmd.<symbol>` with JetStream `publish_async` (pipelined, all
acked) and waits until every execution report reached `ex.exec.<symbol>`:

- Workload: 55% passive limit orders (GTC, 1-10 lots, within 50 ticks of 100.00 on their side), 20%
  aggressive limits that cross, 5% market orders, 20% cancels of an earlier order (some already filled:
  those are rejected, with a reason). The expected reports are computed first by `OrderBook.apply` in
  this process; the service's reports must be exactly those (same seqs, same bodies).
- Flat out (the default): every command published as fast as the acks allow, so the service sees
  them in bursts. With `--rate R` they are paced at R commands/s (a few per millisecond, like the
  broker's one-order-at-a-time commands): the CPU per command of a service that is not saturated.
- commands/s = n / (first publish until the last report arrived), wall clock.
- CPU ms per command = the orderbook process's CPU time (user + system, psutil) over the same interval
  / n: on this shared machine the steadier figure (other processes' load shows up as wall time only).
- Figures are the medians over `--runs`; the load average is printed and written.

Writes bench/results/orderbook_service.json: [{"figure", "value", "unit", "compare", "ratio"}].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))

import httpx  # noqa: E402
import nats  # noqa: E402
import psutil  # noqa: E402
from _rows import row  # noqa: E402

from papertrade.book import BookCommand, OpenBookCmd, OrderBook  # noqa: E402
from papertrade.bus import subjects  # noqa: E402
from papertrade.bus.streams import EX_CMD_STREAM, EX_EXEC_STREAM, ensure_streams  # noqa: E402
from papertrade.codec import decode, encode  # noqa: E402
from papertrade.enums import OrderType, Side, TimeInForce  # noqa: E402
from papertrade.messages import CancelCmd, ExecReport, NewOrderCmd  # noqa: E402
from papertrade.stack.infra import Infra  # noqa: E402
from papertrade.stack.launch import service_env, service_url, start_service, wait_ready  # noqa: E402
from papertrade.stack.procs import free_port  # noqa: E402
from papertrade.stack.services import spec  # noqa: E402

RESULTS = ROOT / "bench" / "results"
T0 = datetime(2030, 1, 2, 15, 0, tzinfo=UTC)
MID = 10_000  # ticks of 0.01: 100.00
TICK = Decimal("0.01")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=int, default=0, help="pace the commands at this many per second")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-orderbook-") as tmp:
        # only Postgres is adopted from the environment (Infra checks it exists; the orderbook never uses it)
        infra_env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "REDIS_URL")}
        with Infra(Path(tmp), env=infra_env) as ep:
            s = spec("orderbook")
            env = service_env(
                s,
                {
                    **ep.env(),
                    "LOG_LEVEL": "WARNING",
                    "ORDERBOOK_LIQUIDITY_ENABLED": "false",
                    "ORDERBOOK_WATCHLIST_POLL_SECONDS": "5",
                },
                {"orderbook": free_port()},
            )
            proc = start_service(s, env, Path(tmp) / "logs")
            try:
                url = service_url(s, env)
                wait_ready(proc, url, timeout=120)
                assert proc.pid is not None
                runs = asyncio.run(_runs(ep.nats_url, url, proc.pid, args.n, args.runs, args.seed, args.rate))
            finally:
                proc.stop()
    _report(runs, args.n, args.rate)
    return 0


async def _runs(
    nats_url: str, url: str, pid: int, n: int, runs: int, seed: int, rate: int
) -> list[dict[str, float]]:
    nc = await nats.connect(nats_url, name="bench-orderbook", pending_size=256 * 1024 * 1024)
    js = nc.jetstream(publish_async_max_pending=10_000)
    await ensure_streams(js, (EX_CMD_STREAM, EX_EXEC_STREAM))
    service = psutil.Process(pid)
    out = []
    try:
        for i in range(runs):
            symbol = "Z" + uuid.uuid4().hex[:7].upper()
            commands = _workload(symbol, n, random.Random(seed))
            expected = _expected(symbol, commands)
            await js.publish(subjects.ex_cmd(symbol), encode(OpenBookCmd(symbol=symbol, t=T0)))
            await _wait_symbol(url, symbol)
            figures = await _one(nc, js, service, symbol, commands, expected, rate)
            figures["loadavg"] = os.getloadavg()[0]
            print(
                f"run {i + 1}: {figures['commands_per_s']:,.0f} commands/s, "
                f"{figures['cpu_ms_per_command']:.3f} CPU ms/command "
                f"({figures['reports']:,.0f} reports, load average {figures['loadavg']:.1f})"
            )
            out.append(figures)
    finally:
        await nc.close()
    return out


async def _one(
    nc: Any,
    js: Any,
    service: psutil.Process,
    symbol: str,
    commands: list[BookCommand],
    expected: list[bytes],
    rate: int,
) -> dict[str, float]:
    received: list[bytes] = []
    done = asyncio.Event()
    want = len(expected)

    async def on_report(msg: Any) -> None:
        received.append(msg.data)
        if len(received) >= want:
            done.set()

    sub = await nc.subscribe(subjects.ex_exec(symbol), cb=on_report, pending_msgs_limit=10_000_000)
    await nc.flush()
    subject = subjects.ex_cmd(symbol)
    bodies = [encode(c) for c in commands]
    cpu0 = _cpu(service)
    t0 = time.perf_counter()
    chunk = max(1, rate // 1000)
    for i, body in enumerate(bodies):
        if rate and i % chunk == 0:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        await js.publish_async(subject, body)
    await js.publish_async_completed()
    await asyncio.wait_for(done.wait(), timeout=600)
    elapsed = time.perf_counter() - t0
    cpu = _cpu(service) - cpu0
    await sub.unsubscribe()
    got = sorted((decode(b, ExecReport) for b in received), key=lambda r: r.seq)
    want_reports = [decode(b, ExecReport) for b in expected]
    if got != want_reports:
        raise AssertionError(f"{symbol}: the service's reports differ from OrderBook.apply's")
    n = len(commands)
    return {
        "commands_per_s": n / elapsed,
        "cpu_ms_per_command": 1000 * cpu / n,
        "cpu_percent": 100 * cpu / elapsed,
        "reports": float(len(received)),
    }


def _workload(symbol: str, n: int, rng: random.Random) -> list[BookCommand]:
    out: list[BookCommand] = []
    placed: list[tuple[uuid.UUID, uuid.UUID]] = []
    accounts = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(50)]
    for i in range(n):
        t = T0 + timedelta(microseconds=i)
        r = rng.random()
        acct = rng.choice(accounts)
        if r < 0.20 and placed:
            oid, owner = placed[rng.randrange(len(placed))]
            out.append(CancelCmd(order_id=oid, account_id=owner, symbol=symbol, t=t))
            continue
        oid = uuid.UUID(int=rng.getrandbits(128))
        side = Side.BUY if rng.random() < 0.5 else Side.SELL
        sign = 1 if side is Side.BUY else -1
        qty = Decimal(rng.randint(1, 10))
        if r < 0.75:  # passive
            tick: int | None = MID - sign * rng.randint(1, 50)
        elif r < 0.95:  # aggressive
            tick = MID + sign * rng.randint(1, 20)
        else:
            tick = None
        out.append(
            NewOrderCmd(
                order_id=oid,
                account_id=acct,
                symbol=symbol,
                side=side,
                type=OrderType.LIMIT if tick is not None else OrderType.MARKET,
                time_in_force=TimeInForce.GTC if tick is not None else TimeInForce.IOC,
                t=t,
                qty=qty,
                limit_price=None if tick is None else tick * TICK,
            )
        )
        placed.append((oid, acct))
    return out


def _expected(symbol: str, commands: list[BookCommand]) -> list[bytes]:
    book = OrderBook(symbol)
    return [encode(r) for c in commands for r in book.apply(c)]


async def _wait_symbol(url: str, symbol: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            if symbol in (await http.get("/v1/symbols")).json():
                return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the orderbook did not open {symbol} within {timeout:g} s")


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def _report(runs: list[dict[str, float]], n: int, rate: int) -> None:
    rate_ = median(r["commands_per_s"] for r in runs)
    cpu = median(r["cpu_ms_per_command"] for r in runs)
    load = median(r["loadavg"] for r in runs)
    per_core = 1000 / cpu
    paced = f" paced at {rate:,}/s" if rate else ""
    print(
        f"orderbook service, {n:,} commands{paced} x {len(runs)} runs (medians): {rate_:,.0f} commands/s, "
        f"{cpu:.3f} CPU ms/command (= {per_core:,.0f} commands/s per core), load average {load:.1f}"
    )
    rows = [
        row(f"commands/s end to end{paced} (NATS in, reports out)", round(rate_), "commands/s", None, None),
        row(f"orderbook CPU per command{paced}", round(cpu, 4), "ms", None, None),
        row(
            f"commands/s per core of orderbook CPU{paced}",
            round(per_core),
            "commands/s",
            "issue #6 target",
            2000,
        ),
        row("load average during the runs", round(load, 2), "", None, None),
    ]
    RESULTS.mkdir(exist_ok=True)
    name = f"orderbook_service_paced_{rate}.json" if rate else "orderbook_service.json"
    (RESULTS / name).write_text(json.dumps(rows, indent=2))
    print(f"written {RESULTS / name}")


if __name__ == "__main__":
    sys.exit(main())
