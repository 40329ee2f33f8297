from papertrade.db import run_alembic_env
from papertrade_broker.tables import metadata

run_alembic_env(metadata)
