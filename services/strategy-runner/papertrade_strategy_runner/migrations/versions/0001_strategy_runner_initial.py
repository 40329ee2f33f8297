"""Strategy deployments.

Revision ID: 0001_strategy_runner_initial
Revises:
"""

from alembic import op

from papertrade_strategy_runner import tables

revision = "0001_strategy_runner_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    tables.deployments.create(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    tables.deployments.drop(op.get_bind(), checkfirst=True)
