"""Load a strategy class from an entrypoint `package.module:Class` and build it with params."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from papertrade.strategy.base import ParamsError, Strategy, resolve_params


class StrategyLoadError(ValueError):
    """The entrypoint does not name an importable Strategy subclass, or its params are bad."""


def load_strategy_class(entrypoint: str) -> type[Strategy]:
    """The class named by `package.module:Class` (or `package.module.Class`)."""
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        raise StrategyLoadError("entrypoint is empty; expected 'package.module:Class'")
    text = entrypoint.strip()
    if ":" in text:
        module_name, _, attr = text.partition(":")
    else:
        module_name, _, attr = text.rpartition(".")
    if not module_name or not attr:
        raise StrategyLoadError(f"entrypoint {entrypoint!r} is not of the form 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise StrategyLoadError(
            f"entrypoint {entrypoint!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise StrategyLoadError(
                f"entrypoint {entrypoint!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not inspect.isclass(obj) or not issubclass(obj, Strategy):
        raise StrategyLoadError(f"entrypoint {entrypoint!r} is not a subclass of papertrade.Strategy")
    if obj is Strategy:
        raise StrategyLoadError("entrypoint names papertrade.Strategy itself; name your subclass")
    return obj


def build_strategy(entrypoint: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Load, check params and instantiate; every problem is a StrategyLoadError with the reason."""
    cls = load_strategy_class(entrypoint)
    try:
        resolve_params(cls, params)
    except ParamsError as exc:
        raise StrategyLoadError(f"bad params for {entrypoint}: {exc}") from None
    try:
        return cls(params)
    except Exception as exc:
        raise StrategyLoadError(
            f"{entrypoint}: constructing the strategy failed: {type(exc).__name__}: {exc}"
        ) from None
