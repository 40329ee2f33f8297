"""What open orders hold per account, symbol and side, kept by triggers on `orders`.

A submit checked buying power by summing `reserved` over every open order of its account: its cost
grew with the account's open orders (~1 us each: 6,000 open orders made every submit ~5 ms slower).
`order_holds` keeps those sums; the upgrade fills it from the open orders there are.

Revision ID: 0003_order_holds
Revises: 0002_ledger_dead_letters
"""

from alembic import op

from papertrade_broker import tables

revision = "0003_order_holds"
down_revision = "0002_ledger_dead_letters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    tables.order_holds.create(op.get_bind(), checkfirst=True)
    # No order may change between the fill and the triggers: they would miss it, or count it twice.
    op.execute("LOCK TABLE orders IN SHARE ROW EXCLUSIVE MODE")
    for statement in tables.order_holds_sql():
        op.execute(statement)
    op.execute("DELETE FROM order_holds")
    op.execute(
        f"""
INSERT INTO order_holds (account_id, symbol, side, reserved, open_qty)
SELECT account_id, symbol, side, sum(reserved), sum(coalesce(qty - filled_qty, 0)) FROM orders
WHERE status IN {tables.OPEN_SQL} GROUP BY account_id, symbol, side
"""
    )


def downgrade() -> None:
    for event in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS orders_holds_{event} ON orders")
        op.execute(f"DROP FUNCTION IF EXISTS order_holds_{event}()")
    tables.order_holds.drop(op.get_bind(), checkfirst=True)
