"""Accounts the stack itself trades for.

The orderbook's synthetic liquidity agent trades as `LIQUIDITY_ACCOUNT_ID`: its commands go through
the same `ex.cmd.<symbol>` stream as everyone's (so a replay rebuilds the book exactly), and the broker
acknowledges and skips execution reports of accounts it does not keep, this one included.
"""

from __future__ import annotations

from uuid import UUID

LIQUIDITY_ACCOUNT_ID = UUID("00000000-0000-4000-8000-00000000a11c")
