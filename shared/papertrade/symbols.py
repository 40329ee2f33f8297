"""Symbols and their one mapping to NATS subject tokens.

A symbol is upper case: letters, digits and `.`, `/`, `-` inside (`AAPL`, `BRK.B`), at most 21
characters; a crypto symbol carries a leading `@` (`@BTCUSD`). A `.` cannot appear in a NATS subject
token, so `subject_token` maps it to `_` (which a symbol may not contain, so the mapping is one to one
and `symbol_from_token` inverts it).
"""

from __future__ import annotations

import re

from papertrade.errors import ValidationError

_SYMBOL_RE = re.compile(r"^@?[A-Z0-9](?:[A-Z0-9./-]{0,19}[A-Z0-9])?$")


def normalize_symbol(value: object, field: str = "symbol") -> str:
    """The canonical (upper case) symbol, or ValidationError naming `field` with what is wrong."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    sym = value.strip().upper()
    if not sym:
        raise ValidationError(field, "is empty")
    if not _SYMBOL_RE.match(sym):
        raise ValidationError(
            field,
            f"{value!r} is not a valid symbol (letters and digits, '.', '/' or '-' inside, "
            "at most 21 characters, '@' first for crypto)",
        )
    return sym


def is_crypto(symbol: str) -> bool:
    """Crypto symbols (leading `@`) trade 24/7."""
    return symbol.startswith("@")


def subject_token(symbol: str) -> str:
    """The NATS subject token of a (normalized) symbol: `BRK.B` -> `BRK_B`, `@BTCUSD` -> `@BTCUSD`."""
    return symbol.replace(".", "_")


def symbol_from_token(token: str) -> str:
    """Inverse of `subject_token`."""
    return token.replace("_", ".")
