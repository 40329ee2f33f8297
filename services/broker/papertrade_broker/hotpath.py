"""The submit hot path in plain psycopg 3: a pool of raw connections and prepared statements.

SQLAlchemy (Core, async) stays the schema's and Alembic's, and serves the rarer routes; a submit
spends two round trips here instead of four (pipeline mode: BEGIN + the locking read, then the
INSERT + COMMIT) and no SQL compilation.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import make_url

from papertrade.enums import OrderStatus

OPEN_STATUSES = [s.value for s in OrderStatus if s.is_open]

#: Lock the account; what its open orders hold, the open quantity of the same symbol and side,
#: and the positions that matter (this symbol's, and every short).
LOCK_ACCOUNT = """
SELECT a.cash,
  (SELECT coalesce(sum(o.reserved), 0) FROM orders o
    WHERE o.account_id = %(a)s AND o.status = ANY(%(open)s)) AS reserved,
  (SELECT coalesce(sum(o.qty - o.filled_qty), 0) FROM orders o
    WHERE o.account_id = %(a)s AND o.status = ANY(%(open)s) AND o.symbol = %(s)s AND o.side = %(side)s
      AND o.qty IS NOT NULL) AS same_side,
  (SELECT json_agg(json_build_array(p.symbol, p.qty::text)) FROM positions p
    WHERE p.account_id = %(a)s AND (p.symbol = %(s)s OR p.qty < 0)) AS held
FROM accounts a WHERE a.id = %(a)s FOR UPDATE OF a
"""

_COLUMNS = (
    "id",
    "account_id",
    "client_order_id",
    "symbol",
    "side",
    "type",
    "time_in_force",
    "qty",
    "notional",
    "limit_price",
    "stop_price",
    "all_or_none",
    "extended_hours",
    "status",
    "reserve_price",
    "reserved",
    "created_at",
    "updated_at",
    "submitted_at",
)
INSERT_ORDER = f"INSERT INTO orders ({', '.join(_COLUMNS)}) VALUES ({', '.join(f'%({c})s' for c in _COLUMNS)}) RETURNING *"


def libpq_url(database_url: str) -> str:
    """The libpq form of a SQLAlchemy URL (`postgresql+psycopg://...` -> `postgresql://...`)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def new_pool(database_url: str, size: int) -> AsyncConnectionPool[AsyncConnection[dict[str, Any]]]:
    """A closed pool (open it with `await pool.open()`); rows come back as dicts."""
    return AsyncConnectionPool(
        libpq_url(database_url),
        min_size=min(4, size),
        max_size=size,
        open=False,
        connection_class=AsyncConnection[dict[str, Any]],
        kwargs={"row_factory": dict_row, "autocommit": False, "prepare_threshold": 0},
        name="broker-hotpath",
    )
