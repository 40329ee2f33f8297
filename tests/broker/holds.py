"""The check that `order_holds` (kept by triggers) says what an account's open orders hold."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg

from papertrade_broker.tables import OPEN_SQL

#: Per symbol and side of an account, in one statement (one snapshot, so writers may run meanwhile):
#: what `order_holds` keeps and what its open orders sum to, where the two differ.
_DIFFERENCES = f"""
WITH summed AS (
  SELECT symbol, side, sum(reserved) AS reserved, sum(coalesce(qty - filled_qty, 0)) AS open_qty
  FROM orders WHERE account_id = %(a)s AND status IN {OPEN_SQL} GROUP BY symbol, side
), kept AS (
  SELECT symbol, side, reserved, open_qty FROM order_holds WHERE account_id = %(a)s
)
SELECT coalesce(s.symbol, k.symbol), coalesce(s.side, k.side), k.reserved, s.reserved, k.open_qty, s.open_qty
FROM summed s FULL JOIN kept k ON k.symbol = s.symbol AND k.side = s.side
WHERE coalesce(k.reserved, 0) <> coalesce(s.reserved, 0) OR coalesce(k.open_qty, 0) <> coalesce(s.open_qty, 0)
"""


def check_holds(db: psycopg.Connection[Any], acct: UUID) -> None:
    """Per symbol and side: `reserved` = the sum over open orders of theirs, `open_qty` = the sum of
    their `qty - filled_qty` (orders by notional: none); no row where nothing is open holds anything."""
    differences = db.execute(_DIFFERENCES, {"a": acct}).fetchall()
    assert not differences, f"order_holds (kept, summed) differ for {acct}: {differences}"
