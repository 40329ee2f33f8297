"""The row every benchmark writes to `bench/results/<area>.json` (what `run_all.py` tabulates)."""

from __future__ import annotations

from typing import Any


def row(figure: str, value: Any, unit: str, compare_name: str | None, compare_value: Any) -> dict[str, Any]:
    """One figure: our value and unit, what it is compared with (name and value), and the ratio."""
    ratio = None
    if isinstance(value, (int, float)) and isinstance(compare_value, (int, float)) and compare_value:
        ratio = round(value / compare_value, 3)
    compare = f"{compare_name}: {compare_value}" if compare_name else None
    return {"figure": figure, "value": value, "unit": unit, "compare": compare, "ratio": ratio}
