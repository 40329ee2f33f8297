"""The broker's ledger: accounts, api keys, orders, executions, positions.

Revision ID: 0001_broker_initial
Revises:
"""

from alembic import op

from papertrade_broker import tables

revision = "0001_broker_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SEQUENCE IF NOT EXISTS orders_seq")
    op.execute("CREATE SEQUENCE IF NOT EXISTS executions_seq")
    bind = op.get_bind()
    for table in (tables.accounts, tables.api_keys, tables.orders, tables.executions, tables.positions):
        table.create(bind, checkfirst=True)


def downgrade() -> None:
    bind = op.get_bind()
    for table in (tables.positions, tables.executions, tables.orders, tables.api_keys, tables.accounts):
        table.drop(bind, checkfirst=True)
    op.execute("DROP SEQUENCE IF EXISTS executions_seq")
    op.execute("DROP SEQUENCE IF EXISTS orders_seq")
