"""Alembic environment of the risk service (run by papertrade.db.migrate at start-up)."""

from papertrade.db import run_alembic_env
from papertrade_risk.tables import metadata

run_alembic_env(metadata)
