"""The broker's Postgres tables (SQLAlchemy Core). Money and quantities are NUMERIC, times timestamptz."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from papertrade.enums import OrderStatus

#: The statuses of an order that still works (or may) at the book.
OPEN_STATUSES = tuple(sorted(s.value for s in OrderStatus if s.is_open))
#: The same as an SQL list, `('accepted', ...)`: inlined in statements (not a parameter), so that the
#: partial index `ix_orders_open` serves them.
OPEN_SQL = "(" + ", ".join(f"'{s}'" for s in OPEN_STATUSES) + ")"

metadata = MetaData()

accounts = Table(
    "accounts",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False),
    Column("account_number", String(32), nullable=False, unique=True),
    Column("cash", Numeric, nullable=False),
    Column("starting_cash", Numeric, nullable=False),
    Column("fees", Numeric, nullable=False, server_default=text("0")),
    Column("realized_pl", Numeric, nullable=False, server_default=text("0")),
    Column("shorting_enabled", Boolean, nullable=False, server_default=text("true")),
    Column("commission", JSONB, nullable=True),
    Column("self_trade_prevention", String(16), nullable=False, server_default=text("'none'")),
    Column("status", String(16), nullable=False, server_default=text("'ACTIVE'")),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("account_id", UUID(as_uuid=True), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("salt", LargeBinary, nullable=False),
    Column("secret_hash", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_api_keys_account", "account_id"),
)

orders = Table(
    "orders",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column(
        "seq", BigInteger, autoincrement=True, nullable=False, server_default=text("nextval('orders_seq')")
    ),
    Column("account_id", UUID(as_uuid=True), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("client_order_id", String(128), nullable=False),
    Column("symbol", String(32), nullable=False),
    Column("side", String(8), nullable=False),
    Column("type", String(16), nullable=False),
    Column("time_in_force", String(8), nullable=False),
    Column("qty", Numeric, nullable=True),
    Column("notional", Numeric, nullable=True),
    Column("limit_price", Numeric, nullable=True),
    Column("stop_price", Numeric, nullable=True),
    Column("all_or_none", Boolean, nullable=False, server_default=text("false")),
    Column("extended_hours", Boolean, nullable=False, server_default=text("false")),
    Column("status", String(20), nullable=False),
    Column("filled_qty", Numeric, nullable=False, server_default=text("0")),
    Column("filled_notional", Numeric, nullable=False, server_default=text("0")),
    Column("fees", Numeric, nullable=False, server_default=text("0")),
    #: buying power held per unit of the unfilled quantity, and what it holds now
    Column("reserve_price", Numeric, nullable=False, server_default=text("0")),
    Column("reserved", Numeric, nullable=False, server_default=text("0")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("submitted_at", DateTime(timezone=True), nullable=False),
    Column("filled_at", DateTime(timezone=True), nullable=True),
    Column("canceled_at", DateTime(timezone=True), nullable=True),
    Column("expired_at", DateTime(timezone=True), nullable=True),
    Column("failed_at", DateTime(timezone=True), nullable=True),
    Column("replaced_at", DateTime(timezone=True), nullable=True),
    Column("replaced_by", UUID(as_uuid=True), nullable=True),
    Column("replaces", UUID(as_uuid=True), nullable=True),
    Column("reason", Text, nullable=True),
    UniqueConstraint("account_id", "client_order_id", name="uq_orders_account_client_order_id"),
    Index("ix_orders_account_seq", "account_id", "seq"),
    Index(
        "ix_orders_open",
        "account_id",
        "symbol",
        postgresql_where=text(f"status IN {OPEN_SQL}"),
    ),
)

#: What an account's open orders hold, per symbol and side: the sum of their `reserved` (buying
#: power) and of their open quantity (`qty - filled_qty`; orders by notional count none). Kept by
#: triggers on `orders` (`order_holds_sql`) in the transaction that changes an order, whoever changes
#: it, so a submit reads a few rows instead of summing every open order of its account.
order_holds = Table(
    "order_holds",
    metadata,
    Column("account_id", UUID(as_uuid=True), ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
    Column("symbol", String(32), primary_key=True),
    Column("side", String(8), primary_key=True),
    Column("reserved", Numeric, nullable=False, server_default=text("0")),
    Column("open_qty", Numeric, nullable=False, server_default=text("0")),
)

executions = Table(
    "executions",
    metadata,
    Column("exec_id", String(128), primary_key=True),
    Column("order_id", UUID(as_uuid=True), primary_key=True),
    Column("account_id", UUID(as_uuid=True), nullable=False),
    Column("symbol", String(32), nullable=False),
    Column("side", String(8), nullable=False),
    Column("qty", Numeric, nullable=False),
    Column("price", Numeric, nullable=False),
    Column("fee", Numeric, nullable=False),
    Column("liquidity", String(8), nullable=True),
    Column("cum_qty", Numeric, nullable=False),
    Column("leaves_qty", Numeric, nullable=False),
    Column("t", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("seq", BigInteger, nullable=False, server_default=text("nextval('executions_seq')")),
    Index("ix_executions_account_seq", "account_id", "seq"),
)

positions = Table(
    "positions",
    metadata,
    Column("account_id", UUID(as_uuid=True), primary_key=True),
    Column("symbol", String(32), primary_key=True),
    Column("qty", Numeric, nullable=False),
    Column("cost", Numeric, nullable=False),
    Column("realized_pl", Numeric, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: Execution reports the ledger could not book (unreadable, or failing on their own `MAX_DELIVERIES`
#: times): kept as received, for an operator to repair and publish again; never silently gone.
ledger_dead_letters = Table(
    "ledger_dead_letters",
    metadata,
    Column("stream_seq", BigInteger, primary_key=True),
    Column("subject", String(256), nullable=False),
    Column("deliveries", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)


def order_holds_sql() -> list[str]:
    """The statements that keep `order_holds`: statement-level triggers on `orders` (one upsert per
    statement, whatever its number of rows) adding the new rows' holdings and taking away the old
    rows'. An order holds `reserved` and its open quantity while its status is open, nothing after.
    Rows are written in key order, so two transactions never wait on each other's rows in a cycle.
    Migration 0003 runs these; a change here needs a migration that runs them again.
    """

    def holds(rows: str, sign: str = "") -> str:
        return f"""
      SELECT account_id, symbol, side, {sign}reserved AS reserved,
        {sign}coalesce(qty - filled_qty, 0) AS open_qty
      FROM {rows} WHERE status IN {OPEN_SQL}"""

    upsert = """
  INSERT INTO order_holds AS h (account_id, symbol, side, reserved, open_qty)
  SELECT account_id, symbol, side, sum(reserved), sum(open_qty) FROM ({deltas}) AS d
  GROUP BY account_id, symbol, side HAVING sum(reserved) <> 0 OR sum(open_qty) <> 0
  ORDER BY account_id, symbol, side
  ON CONFLICT (account_id, symbol, side) DO UPDATE
    SET reserved = h.reserved + EXCLUDED.reserved, open_qty = h.open_qty + EXCLUDED.open_qty;"""
    bodies = {
        "insert": upsert.format(deltas=holds("new_orders")),
        "update": upsert.format(deltas=holds("new_orders") + "\n      UNION ALL" + holds("old_orders", "-")),
        # Deleted only with their account (the holdings' rows go with it): no upsert, no new row.
        "delete": f"""
  UPDATE order_holds AS h SET reserved = h.reserved - d.reserved, open_qty = h.open_qty - d.open_qty
  FROM (SELECT account_id, symbol, side, sum(reserved) AS reserved, sum(open_qty) AS open_qty
        FROM ({holds("old_orders")}) AS o GROUP BY account_id, symbol, side) AS d
  WHERE h.account_id = d.account_id AND h.symbol = d.symbol AND h.side = d.side;""",
    }
    tables = {
        "insert": "NEW TABLE AS new_orders",
        "update": "OLD TABLE AS old_orders NEW TABLE AS new_orders",
        "delete": "OLD TABLE AS old_orders",
    }
    out: list[str] = []
    for event, body in bodies.items():
        out.append(
            f"CREATE OR REPLACE FUNCTION order_holds_{event}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
            f"BEGIN{body}\n  RETURN NULL;\nEND $$"
        )
        out.append(f"DROP TRIGGER IF EXISTS orders_holds_{event} ON orders")
        out.append(
            f"CREATE TRIGGER orders_holds_{event} AFTER {event.upper()} ON orders "
            f"REFERENCING {tables[event]} FOR EACH STATEMENT EXECUTE FUNCTION order_holds_{event}()"
        )
    return out


__all__ = [
    "OPEN_SQL",
    "OPEN_STATUSES",
    "accounts",
    "api_keys",
    "executions",
    "ledger_dead_letters",
    "metadata",
    "order_holds",
    "order_holds_sql",
    "orders",
    "positions",
]
