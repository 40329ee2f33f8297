"""Execution reports the ledger could not book, kept as received.

Revision ID: 0002_ledger_dead_letters
Revises: 0001_broker_initial
"""

from alembic import op

from papertrade_broker import tables

revision = "0002_ledger_dead_letters"
down_revision = "0001_broker_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    tables.ledger_dead_letters.create(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    tables.ledger_dead_letters.drop(op.get_bind(), checkfirst=True)
