"""papertrade: the shared library of the paper-trading stack.

Pure cores (models, matching, ledger, risk rules, bars) with no I/O, the NATS subjects and codecs,
settings, the service skeleton and the strategy SDK.
"""

from papertrade.enums import (
    ExecType,
    Interval,
    LiquiditySide,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
)
from papertrade.errors import ValidationError

__all__ = [
    "ExecType",
    "Interval",
    "LiquiditySide",
    "OrderStatus",
    "OrderType",
    "Side",
    "TimeInForce",
    "ValidationError",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The SDK's Strategy is imported lazily so that `import papertrade` stays light for services.
    if name == "Strategy":
        from papertrade.strategy import Strategy

        return Strategy
    raise AttributeError(f"module 'papertrade' has no attribute {name!r}")
