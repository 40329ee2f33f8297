from papertrade.db import run_alembic_env
from papertrade_strategy_runner.tables import metadata

run_alembic_env(metadata)
