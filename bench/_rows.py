"""The row every benchmark writes to `bench/results/<area>.json` (what `run_all.py` tabulates)."""

from __future__ import annotations

import contextlib
import platform
import sys
from pathlib import Path
from typing import Any


def row(figure: str, value: Any, unit: str, compare_name: str | None, compare_value: Any) -> dict[str, Any]:
    """One figure: our value and unit, what it is compared with (name and value), and the ratio."""
    ratio = None
    if isinstance(value, (int, float)) and isinstance(compare_value, (int, float)) and compare_value:
        ratio = round(value / compare_value, 3)
    compare = f"{compare_name}: {compare_value}" if compare_name else None
    return {"figure": figure, "value": value, "unit": unit, "compare": compare, "ratio": ratio}


def interpreter() -> str:
    """Which Python runs the benchmark and how it was built, since that moves every figure: the
    images' `python:3.11-slim` is built with PGO and LTO into a static executable; a build that loads
    libpython as a shared library (pyenv's default) runs the same Python code markedly slower."""
    shared = False
    with contextlib.suppress(OSError):
        shared = "libpython" in Path("/proc/self/maps").read_text()
    build = "libpython loaded as a shared library" if shared else "libpython linked in"
    return f"{platform.python_implementation()} {platform.python_version()} ({sys.executable}; {build})"
