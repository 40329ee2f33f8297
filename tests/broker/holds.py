"""The check that `order_holds` (kept by triggers) says what an account's open orders hold."""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg

from papertrade_broker.tables import OPEN_SQL


def check_holds(db: psycopg.Connection[Any], acct: UUID) -> None:
    """Per symbol and side: `reserved` = the sum over open orders of theirs, `open_qty` = the sum of
    their `qty - filled_qty` (orders by notional: none); no row where nothing is open holds anything."""
    summed = {
        (symbol, side): (reserved, open_qty)
        for symbol, side, reserved, open_qty in db.execute(
            "SELECT symbol, side, sum(reserved), sum(coalesce(qty - filled_qty, 0)) FROM orders"
            f" WHERE account_id = %s AND status IN {OPEN_SQL} GROUP BY symbol, side",
            (acct,),
        )
    }
    kept = {
        (symbol, side): (reserved, open_qty)
        for symbol, side, reserved, open_qty in db.execute(
            "SELECT symbol, side, reserved, open_qty FROM order_holds WHERE account_id = %s", (acct,)
        )
    }
    zero = (Decimal(0), Decimal(0))
    for key in summed.keys() | kept.keys():
        assert kept.get(key, zero) == summed.get(key, zero), (key, kept.get(key), summed.get(key))
