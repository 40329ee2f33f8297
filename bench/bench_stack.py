"""The local stack's cost: `make up` wall time to ready (cold: empty data dir; warm: data kept), Ctrl-C
time to a clean exit, and the memory of the idle stack (services plus embedded NATS/Postgres/Redis).

    .venv/bin/python bench/bench_stack.py

Method. `up` times run the real command (`python -m papertrade.stack up --no-demo --free-ports
--data-dir <tmp>`, which is what `make up` runs once the venv exists) and stop the clock when it has
written stack.env, i.e. when all five services answered /readyz. Memory: `papertrade.stack.runner.Stack`
started in this process with embedded infra, left idle 10 s, then RSS and PSS summed over every process
of the stack (each service, nats-server, redis-server, postgres and all its backends). PSS splits shared
pages between processes, so it is the honest sum; RSS counts shared pages once per process. The
compare column of the per-service figure is a bare interpreter that imports the service skeleton
(`papertrade.service`: FastAPI, uvicorn, SQLAlchemy, nats, redis), the floor a service cannot go under.
Writes bench/results/stack.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))

from papertrade.stack.runner import STACK_ENV_FILE, Stack  # noqa: E402

IDLE_SECONDS = 10.0
READY_LIMIT = 90.0  # the bound: all five services ready within 90 s
MB = 1024 * 1024


def main() -> int:
    console = Console()
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL", "REDIS_URL")}
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        data = Path(tmp) / "pt"
        cold, _cold_stop = _time_up(data, env)
        warm, warm_stop = _time_up(data, env)
        sequential, _ = _time_up(data, env, "--sequential")
    rows.append(_row("make up to ready, cold (empty data dir: initdb)", cold, "s", READY_LIMIT))
    rows.append(_row("make up to ready, warm (data kept)", warm, "s", READY_LIMIT))
    rows.append(_row("make up to ready, warm, --sequential (each after the previous)", sequential, "s", warm))
    rows.append(_row("Ctrl-C to clean exit (warm run)", warm_stop, "s", None))

    with (
        tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp,
        Stack(Path(tmp), env=env, free_ports=True, persist=True, demo=None, watch_logs=False) as stack,
    ):
        time.sleep(IDLE_SECONDS)
        per: dict[str, tuple[int, int]] = {}
        for name, pid in stack.pids().items():
            per[name] = _tree_memory(pid)
    services = {k: v for k, v in per.items() if not k.startswith("infra:")}
    infra = {k: v for k, v in per.items() if k.startswith("infra:")}
    floor = _skeleton_floor()
    total_rss = sum(r for r, _ in per.values())
    total_pss = sum(p for _, p in per.values())
    rows.append(_row("idle stack RSS, sum of all processes", total_rss / MB, "MB", None))
    rows.append(_row("idle stack PSS, sum of all processes", total_pss / MB, "MB", None))
    rows.append(
        _row("idle services PSS (5 processes)", sum(p for _, p in services.values()) / MB, "MB", None)
    )
    rows.append(
        _row("idle infra PSS (nats, postgres, redis)", sum(p for _, p in infra.values()) / MB, "MB", None)
    )
    mean_service_rss = sum(r for r, _ in services.values()) / len(services) / MB
    rows.append(_row("idle service RSS, mean per service", mean_service_rss, "MB", floor / MB))
    for name, (rss, pss) in sorted(per.items()):
        rows.append(_row(f"idle RSS {name}", rss / MB, "MB", None) | {"pss_mb": round(pss / MB, 1)})

    rows.append(_row("1-min load average before / after (other work on the machine)", load_before, "", None))
    rows[-1]["after"] = round(os.getloadavg()[0], 2)
    table = Table(title=f"papertrade local stack ({os.cpu_count()} CPUs)")
    for col in ("figure", "value", "unit", "compare", "ratio"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for row in rows:
        table.add_row(
            row["figure"],
            f"{row['value']:.1f}",
            row["unit"],
            "" if row["compare"] is None else f"{row['compare']:.1f}",
            "" if row["ratio"] is None else f"{row['ratio']:.2f}",
        )
    console.print(table)
    console.print(
        f"compare: 'make up to ready' against the {READY_LIMIT:g} s bound (--sequential: against the default "
        "warm start: services together unless DEPENDS_ON says otherwise); mean service RSS against a bare "
        "interpreter importing papertrade.service"
    )
    out = ROOT / "bench" / "results" / "stack.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    console.print(f"wrote {out.relative_to(ROOT)}")
    return 0


def _time_up(data: Path, env: dict[str, str], *extra: str) -> tuple[float, float]:
    """(seconds to stack.env, seconds from SIGINT to exit) of one `python -m papertrade.stack up`."""
    start = time.monotonic()
    out = data.parent / "up.out"
    sink = open(out, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "papertrade.stack",
            "up",
            "--no-demo",
            "--free-ports",
            "--data-dir",
            str(data),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=sink,
        stderr=subprocess.STDOUT,
    )
    try:
        while not (data / STACK_ENV_FILE).exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the runner exited with {proc.returncode}:\n{out.read_text()[-3000:]}")
            if time.monotonic() - start > 180:
                raise TimeoutError("the stack was not ready after 180 s")
            time.sleep(0.05)
        ready = time.monotonic() - start
        stop = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        if code != 0:
            raise RuntimeError(f"the runner exited with {code} after SIGINT")
        return ready, time.monotonic() - stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sink.close()


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of a process and all its descendants."""
    rss = pss = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


def _skeleton_floor() -> int:
    """RSS of an idle interpreter that imported the service skeleton."""
    code = (
        "import papertrade.service, sys, time; sys.stdout.write('ok\\n'); sys.stdout.flush(); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        return int(psutil.Process(proc.pid).memory_info().rss)
    finally:
        proc.kill()
        proc.wait()


def _row(figure: str, value: float, unit: str, compare: float | None) -> dict[str, Any]:
    return {
        "figure": figure,
        "value": round(value, 2),
        "unit": unit,
        "compare": None if compare is None else round(compare, 2),
        "ratio": None if compare is None else round(value / compare, 3),
    }


if __name__ == "__main__":
    raise SystemExit(main())
