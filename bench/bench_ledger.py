"""The broker's ledger alone: execution reports in JetStream -> Postgres commit -> trade update.

    .venv/bin/python bench/bench_ledger.py                      # paced 4,000 reports/s, then unpaced
    .venv/bin/python bench/bench_ledger.py --rate 2000 --seconds 10 --runs 3
    .venv/bin/python bench/bench_ledger.py --compare /path/to/other/checkout   # interleaved A/B

Method. NATS/Postgres from NATS_URL/DATABASE_URL (else embedded ones), a fresh database migrated
with the broker's Alembic scripts, `--accounts` accounts and one `pending_new` limit order per two
reports written with the broker's own tables (alternating buy/sell, qty 1). The real ledger process
(`consumer.LedgerProcess`, the broker's code path: spawned child, its own durable) consumes
`ex.exec.>`; this process publishes for each order an `accepted` report and a full `fill`
(core NATS publish into the EX_EXEC stream, report `t` = the wall clock at publish time).

- paced: `--rate` reports/s for `--seconds` (published in 2 ms slices), then until every trade
  update is in. fill-to-commit = a fill report's `t` until its trade update (the ledger publishes it
  after the commit) arrives here: an upper bound of report -> commit.
- unpaced: the same number of reports published as fast as possible with the ledger already
  running; reports/s = reports / (last trade update - first publish).
- ledger CPU µs per report: the ledger process's user+system CPU from the first publish to the
  last trade update, divided by the reports (psutil); likewise its Postgres backend's (the
  connections to the bench database, when Postgres runs on this host).
Every report must come back as exactly one trade update, and the executions table must hold every
fill, or the run fails. Medians over `--runs` are printed beside ../shared/bench/FLOORS.md's floors.
`--compare DIR` runs the same bench with DIR's `services/broker` first on the path (a child
`python bench_ledger.py --json` per run; `papertrade` itself stays this tree's), interleaved with
this tree's runs. Afterwards the bench's reports are purged from the stream and its durable and
database dropped (a fresh durable of a test or service replays the whole stream).
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
from contextlib import ExitStack
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))

import nats  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402
from _rows import interpreter  # noqa: E402
from sqlalchemy import create_engine, insert  # noqa: E402

from papertrade import codec  # noqa: E402
from papertrade.bus import subjects  # noqa: E402
from papertrade.bus.streams import ensure_streams, exec_consumer_config  # noqa: E402
from papertrade.db import migrate  # noqa: E402
from papertrade.enums import ExecType, LiquiditySide, Side  # noqa: E402
from papertrade.messages import ExecReport  # noqa: E402
from papertrade.stack.infra import Endpoints, Infra, create_database  # noqa: E402

SYMBOL = "BENCH"
PRICE = Decimal("100")
FLOORS = {
    "nats_publish": "NATS core publish 340,000 msg/s; JetStream publish_async 39,000 msg/s",
    "pg_commit": "Postgres one-row INSERT + COMMIT 1,655 tx/s, p50 0.54 ms; executemany 33,000 rows/s",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=4000, help="paced reports per second")
    p.add_argument("--seconds", type=float, default=8.0, help="paced duration")
    p.add_argument("--accounts", type=int, default=50)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--compare", type=Path, default=None, help="another checkout to run interleaved")
    p.add_argument("--json", action="store_true", help="one run, its figures as JSON on stdout")
    args = p.parse_args()
    with ExitStack() as stack:
        base = _endpoints(stack)
        if args.json:
            print(json.dumps(asyncio.run(_one(base, args))))
            return 0
        results: dict[str, list[dict[str, Any]]] = {"this tree": []}
        if args.compare is not None:
            results[str(args.compare)] = []
        for i in range(args.runs):
            for name in results:
                print(f"run {i + 1}/{args.runs}: {name} ...", file=sys.stderr, flush=True)
                if name == "this tree":
                    results[name].append(asyncio.run(_one(base, args)))
                else:
                    results[name].append(_child(Path(name), base, args))
        _print(results, args)
    return 0


async def _one(base: Endpoints, args: argparse.Namespace) -> dict[str, Any]:
    from papertrade_broker.consumer import LedgerProcess
    from papertrade_broker.settings import BrokerSettings

    out: dict[str, Any] = {}
    for mode, rate in (("paced", args.rate), ("unpaced", None)):
        n_orders = int(args.rate * args.seconds) // 2
        db = create_database(base.database_url, f"bench_ledger_{uuid.uuid4().hex[:8]}")
        orders = _prepare(db, args.accounts, n_orders)
        durable = f"ledger-bench-{uuid.uuid4().hex[:6]}"
        env = {**os.environ, **base.env(), "DATABASE_URL": db, "BROKER_LEDGER_DURABLE": durable}
        env["LOG_LEVEL"] = "WARNING"
        settings = _settings(BrokerSettings, env)
        nc = await nats.connect(base.nats_url)
        js = nc.jetstream()
        await ensure_streams(js)
        # Only reports published from now on: the durable starts at the stream's end.
        info = await js.stream_info(subjects.STREAM_EX_EXEC)
        ledger = LedgerProcess(settings, durable)
        await _create_durable(js, durable, info.state.last_seq + 1)
        ledger.start()
        try:
            while not ledger.ready:
                await asyncio.sleep(0.05)
            out[mode] = await _drive(nc, ledger, orders, rate, db)
        finally:
            ledger.stop()
            # Leave the shared stream and server as they were: the bench's reports, durable, database.
            await js.purge_stream(subjects.STREAM_EX_EXEC, subject=subjects.ex_exec(SYMBOL))
            await js.delete_consumer(subjects.STREAM_EX_EXEC, durable)
            await nc.close()
            _drop_database(db)
    return out


async def _drive(
    nc: Any, ledger: Any, orders: list[tuple[uuid.UUID, uuid.UUID, Side]], rate: int | None, db: str
) -> dict[str, Any]:
    total = 2 * len(orders)
    latencies: list[float] = []
    received = 0
    last = 0.0
    done = asyncio.Event()

    async def on_update(msg: Any) -> None:
        nonlocal received, last
        now = time.time()
        upd = orjson.loads(msg.data)
        if upd["event"] == "fill":
            latencies.append(now - datetime.fromisoformat(upd["timestamp"]).timestamp())
        received += 1
        last = now
        if received >= total:
            done.set()

    sub = await nc.subscribe("broker.event.>", cb=on_update)
    proc = psutil.Process(ledger._proc.pid)
    # The ledger connects on its first batch: a backend that appears during the run counts from 0.
    pg0 = {pid: sum(psutil.Process(pid).cpu_times()[:2]) for pid in _backends(db)}
    cpu0 = sum(proc.cpu_times()[:2])
    batches0 = _batch_metrics()
    start = time.time()
    subject = subjects.ex_exec(SYMBOL)
    slice_s = 0.002
    sent = 0
    credit = 0.0
    tick = time.perf_counter()
    while sent < len(orders):
        if rate:
            now = time.perf_counter()
            credit += (now - tick) * rate / 2
            tick = now
            burst = min(int(credit), len(orders) - sent)
            credit -= burst
        else:
            burst = min(500, len(orders) - sent)
        for order_id, account_id, side in orders[sent : sent + burst]:
            t = datetime.now(UTC)
            common = {"order_id": order_id, "account_id": account_id, "symbol": SYMBOL, "side": side, "t": t}
            await nc.publish(subject, codec.encode(ExecReport(exec=ExecType.ACCEPTED, seq=1, **common)))
            fill = ExecReport(
                exec=ExecType.FILL,
                seq=2,
                exec_id=f"E{order_id.hex}",
                price=PRICE,
                qty=Decimal(1),
                cum_qty=Decimal(1),
                leaves_qty=Decimal(0),
                liquidity=LiquiditySide.TAKER,
                **common,
            )
            await nc.publish(subject, codec.encode(fill))
        sent += burst
        if rate:
            await nc.flush()
            await asyncio.sleep(max(slice_s - (time.perf_counter() - tick), 0))
        else:
            await asyncio.sleep(0)
    await nc.flush()
    published = time.time()
    try:
        await asyncio.wait_for(done.wait(), timeout=120)
    except TimeoutError:
        pass
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    pg = sum(sum(psutil.Process(pid).cpu_times()[:2]) - pg0.get(pid, 0.0) for pid in _backends(db))
    await asyncio.sleep(1.2)  # the ledger's next metrics snapshot
    count, seconds = _batch_metrics()
    await sub.unsubscribe()
    rows = _count_executions(db)
    if received != total or rows != len(orders):
        raise SystemExit(f"incomplete: {received}/{total} trade updates, {rows}/{len(orders)} executions")
    latencies.sort()
    return {
        "reports": total,
        "offered_per_s": round(total / (published - start)),
        "applied_per_s": round(total / (last - start)),
        "fill_to_commit_p50_ms": round(_pct(latencies, 50) * 1000, 1),
        "fill_to_commit_p99_ms": round(_pct(latencies, 99) * 1000, 1),
        "cpu_us_per_report": round(cpu / total * 1e6, 1),
        "pg_cpu_us_per_report": round(pg / total * 1e6, 1),
        "batches": count - batches0[0],
        "mean_batch": round(total / max(count - batches0[0], 1), 1),
        "mean_batch_ms": round((seconds - batches0[1]) / max(count - batches0[0], 1) * 1000, 2),
    }


async def _create_durable(js: Any, durable: str, start_seq: int) -> None:
    """The bench's durable, created before the ledger binds to it: it starts after what is stored
    (other runs' reports), the rest of its config as `streams.exec_consumer` makes it."""
    await js.add_consumer(subjects.STREAM_EX_EXEC, exec_consumer_config(durable, start_seq))


def _batch_metrics() -> tuple[float, float]:
    """The ledger's batch count and total apply + commit seconds, as it last relayed them."""
    from prometheus_client import REGISTRY

    count = REGISTRY.get_sample_value("papertrade_broker_ledger_batch_seconds_count") or 0.0
    total = REGISTRY.get_sample_value("papertrade_broker_ledger_batch_seconds_sum") or 0.0
    return count, total


def _settings(cls: Any, env: dict[str, str]) -> Any:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return cls()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _prepare(database_url: str, n_accounts: int, n_orders: int) -> list[tuple[uuid.UUID, uuid.UUID, Side]]:
    """Schema, accounts and `pending_new` orders, written with the broker's tables."""
    from papertrade_broker import app as broker_app
    from papertrade_broker.tables import accounts, orders

    migrate(database_url, broker_app.MIGRATIONS, broker_app.VERSION_TABLE)
    now = datetime.now(UTC)
    account_ids = [uuid.uuid4() for _ in range(n_accounts)]
    rows = []
    out = []
    for i in range(n_orders):
        acct = account_ids[i % n_accounts]
        side = Side.BUY if (i // n_accounts) % 2 == 0 else Side.SELL
        oid = uuid.uuid4()
        out.append((oid, acct, side))
        rows.append(
            {
                "id": oid,
                "account_id": acct,
                "client_order_id": oid.hex,
                "symbol": SYMBOL,
                "side": side.value,
                "type": "limit",
                "time_in_force": "day",
                "qty": Decimal(1),
                "limit_price": PRICE,
                "status": "pending_new",
                "reserve_price": PRICE if side is Side.BUY else Decimal(0),
                "reserved": PRICE if side is Side.BUY else Decimal(0),
                "created_at": now,
                "updated_at": now,
                "submitted_at": now,
            }
        )
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            insert(accounts),
            [
                {
                    "id": a,
                    "name": f"bench-{i}",
                    "account_number": f"PB{a.hex[:10].upper()}",
                    "cash": Decimal(10**9),
                    "starting_cash": Decimal(10**9),
                    "created_at": now,
                }
                for i, a in enumerate(account_ids)
            ],
        )
        for k in range(0, len(rows), 5000):
            conn.execute(insert(orders), rows[k : k + 5000])
    engine.dispose()
    return out


def _backends(database_url: str) -> list[int]:
    """The Postgres backends serving the bench database (the ledger's connection), if on this host."""
    import psycopg
    from sqlalchemy.engine import make_url

    from papertrade.stack.infra import libpq_url

    name = make_url(database_url).database
    with psycopg.connect(libpq_url(database_url)) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)
        ).fetchall()
    return [pid for (pid,) in rows if psutil.pid_exists(pid)]


def _drop_database(database_url: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    from papertrade.stack.infra import libpq_url

    url = make_url(database_url)
    with psycopg.connect(libpq_url(str(url.set(database="postgres"))), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')


def _count_executions(database_url: str) -> int:
    import psycopg

    from papertrade.stack.infra import libpq_url

    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM executions").fetchone()
    return int(row[0]) if row else 0


def _child(source: Path, base: Endpoints, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, **base.env()}
    env["PYTHONPATH"] = os.pathsep.join([str(source / "services" / "broker"), str(source / "shared")])
    argv = [sys.executable, __file__, "--json", "--rate", str(args.rate), "--seconds", str(args.seconds)]
    argv += ["--accounts", str(args.accounts)]
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, cwd=source)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _endpoints(stack: ExitStack) -> Endpoints:
    if all(os.environ.get(k) for k in ("NATS_URL", "DATABASE_URL")):
        return Endpoints(
            nats_url=os.environ["NATS_URL"],
            database_url=os.environ["DATABASE_URL"],
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        )
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ledger-")))
    return stack.enter_context(Infra(tmp))


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def _print(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    figures = [
        ("paced", "offered_per_s", f"paced: reports/s offered (target {args.rate})"),
        ("paced", "applied_per_s", "paced: reports/s applied"),
        ("paced", "fill_to_commit_p50_ms", "paced: fill-to-commit p50 ms"),
        ("paced", "fill_to_commit_p99_ms", "paced: fill-to-commit p99 ms (target 50)"),
        ("paced", "cpu_us_per_report", "paced: ledger CPU µs/report"),
        ("paced", "pg_cpu_us_per_report", "paced: its Postgres backend CPU µs/report"),
        ("paced", "mean_batch", "paced: reports per batch"),
        ("paced", "mean_batch_ms", "paced: batch apply + commit ms"),
        ("unpaced", "applied_per_s", "unpaced: reports/s applied"),
        ("unpaced", "cpu_us_per_report", "unpaced: ledger CPU µs/report"),
        ("unpaced", "pg_cpu_us_per_report", "unpaced: its Postgres backend CPU µs/report"),
        ("unpaced", "mean_batch", "unpaced: reports per batch"),
        ("unpaced", "mean_batch_ms", "unpaced: batch apply + commit ms"),
    ]
    names = list(results)
    load = os.getloadavg()[0]
    print(
        f"medians of {args.runs} run(s) (each run in brackets), {args.accounts} accounts, load average {load:.1f}"
    )
    print(f"interpreter: {interpreter()}")
    for i, n in enumerate(names):
        print(f"  [{chr(65 + i)}] {n}")
    print(f"{'figure':40}" + "".join(f"{'[' + chr(65 + i) + ']':>34}" for i in range(len(names))))
    for mode, key, label in figures:
        cells = []
        for n in names:
            values = [r[mode][key] for r in results[n]]
            runs = "/".join(f"{v:g}" for v in values)
            cells.append(f"{statistics.median(values):>10g} ({runs})"[:33].rjust(34))
        print(f"{label:40}" + "".join(cells))
    for name, floor in FLOORS.items():
        print(f"floor {name}: {floor}")


if __name__ == "__main__":
    raise SystemExit(main())
