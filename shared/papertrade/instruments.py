"""Instruments: the price grid (tick) and quantity grid (lot) of a symbol, defined once.

US equities trade on a $0.01 grid in whole shares; crypto (`@` symbols) on a $0.01 grid in lots of
0.0001. The book works in integer ticks and lots; everything outside it in exact decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from papertrade.symbols import is_crypto


@dataclass(frozen=True)
class Instrument:
    symbol: str
    tick: Decimal
    lot: Decimal

    @property
    def crypto(self) -> bool:
        return is_crypto(self.symbol)


EQUITY_TICK = Decimal("0.01")
EQUITY_LOT = Decimal("1")
CRYPTO_TICK = Decimal("0.01")
CRYPTO_LOT = Decimal("0.0001")


def instrument(symbol: str) -> Instrument:
    """The grid of a normalized symbol."""
    if is_crypto(symbol):
        return Instrument(symbol, CRYPTO_TICK, CRYPTO_LOT)
    return Instrument(symbol, EQUITY_TICK, EQUITY_LOT)
