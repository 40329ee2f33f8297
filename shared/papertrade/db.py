"""Postgres helpers: Alembic migrations per owning service, run at start-up under an advisory lock.

Each service that owns tables keeps its own Alembic script directory and its own version table
(`alembic_version_<service>`), so services migrate independently and in parallel replicas safely.
"""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, create_engine, text

from papertrade.stack.infra import ensure_database


def migrate(database_url: str, script_location: Path, version_table: str, revision: str = "head") -> None:
    """Upgrade the database to `revision` (blocking). Replicas racing here serialize on an advisory lock."""
    ensure_database(database_url)
    engine = create_engine(database_url, pool_pre_ping=True)
    lock_id = zlib.crc32(version_table.encode())
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})
            cfg = Config()
            cfg.set_main_option("script_location", str(script_location))
            cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
            cfg.attributes["connection"] = conn
            cfg.attributes["version_table"] = version_table
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


async def migrate_async(database_url: str, script_location: Path, version_table: str) -> None:
    await asyncio.to_thread(migrate, database_url, script_location, version_table)


def run_alembic_env(target_metadata: MetaData) -> None:
    """The body of a service's Alembic `env.py`: online migrations on the connection `migrate` passes.

    A service's `migrations/env.py` is just:

        from papertrade.db import run_alembic_env
        from papertrade_<svc>.tables import metadata
        run_alembic_env(metadata)
    """
    from alembic import context

    cfg = context.config
    connection = cfg.attributes.get("connection")
    version_table = cfg.attributes.get("version_table", "alembic_version")
    if connection is None:
        engine = create_engine(cfg.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=target_metadata, version_table=version_table)
            with context.begin_transaction():
                context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, version_table=version_table)
    with context.begin_transaction():
        context.run_migrations()
