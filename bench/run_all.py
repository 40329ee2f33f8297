"""`make bench`: run every benchmark under bench/ and print one table of all figures.

Each `bench/bench_<area>.py` prints its own figures and writes `bench/results/<area>.json`: a list of
`{"figure", "value", "unit", "compare", "ratio"}` rows (`compare` is the comparison value where there is
one: a floor, a baseline or another library, measured in the same run). This script runs them one after
another (benchmarks share 2 cores: never in parallel), then prints the table and writes
`bench/results/all.json` with a description of the machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    only = [a for a in args if not a.startswith("-")]
    scripts = sorted(p for p in HERE.glob("bench_*.py") if not only or p.stem.removeprefix("bench_") in only)
    RESULTS.mkdir(exist_ok=True)
    console = Console()
    failures: list[str] = []
    for script in scripts:
        console.rule(f"[bold]{script.name}")
        start = time.monotonic()
        proc = subprocess.run([sys.executable, str(script)], cwd=HERE.parent)
        console.print(f"{script.name}: exit {proc.returncode} in {time.monotonic() - start:.1f}s")
        if proc.returncode != 0:
            failures.append(script.name)
    rows = _collect([s.stem.removeprefix("bench_") for s in scripts])
    machine = _machine()
    table = Table(title=f"papertrade benchmarks on {machine['cpus']} CPUs, {machine['python']}")
    for col in ("area", "figure", "ours", "compare", "ratio"):
        table.add_column(col, justify="right" if col in ("ours", "compare", "ratio") else "left")
    for row in rows:
        table.add_row(
            row["area"],
            row["figure"],
            _fmt(row.get("value"), row.get("unit")),
            _fmt(row.get("compare"), row.get("unit")),
            _fmt(row.get("ratio"), "x"),
        )
    console.print(table)
    out = {"machine": machine, "rows": rows, "failed": failures}
    (RESULTS / "all.json").write_text(json.dumps(out, indent=2, default=str))
    console.print(f"written {RESULTS / 'all.json'}")
    if failures:
        console.print(f"[red]failed: {', '.join(failures)}")
    return 1 if failures else 0


def _collect(areas: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for area in areas:
        path = RESULTS / f"{area}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        items = data.get("rows", data) if isinstance(data, dict) else data
        for item in items:
            rows.append({"area": area, **item})
    return rows


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": f"Python {platform.python_version()}",
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _fmt(value: Any, unit: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"
    else:
        text = str(value)
    return f"{text} {unit}" if unit and unit != "x" else (f"{text}x" if unit == "x" else text)


if __name__ == "__main__":
    raise SystemExit(main())
