"""The infra module: env URLs are used as they are; embedded servers only for what is unset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import redis

from papertrade.bus.connect import connect_nats
from papertrade.stack.infra import Endpoints, Infra, create_database, libpq_url


def test_env_urls_are_adopted_and_nothing_is_started(infra: Endpoints, tmp_path: Path) -> None:
    with Infra(tmp_path, env=infra.env()) as adopted:
        assert adopted.embedded == set()
        assert adopted.env() == infra.env()


def test_the_session_infra_answers(infra: Endpoints) -> None:
    assert redis.Redis.from_url(infra.redis_url).ping()
    with psycopg.connect(libpq_url(infra.database_url)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    async def _jetstream() -> None:
        nc = await connect_nats(infra.nats_url, "test")
        info = await nc.jetstream().account_info()
        assert info is not None
        await nc.close()

    asyncio.run(_jetstream())


def test_fresh_databases(infra: Endpoints) -> None:
    url = create_database(infra.database_url, "t_fresh_probe")
    with psycopg.connect(libpq_url(url)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("t_fresh_probe",)


def test_embedded_data_survives_a_restart_when_persistent(tmp_path: Path) -> None:
    with Infra(tmp_path, persist=True, env={}) as first:
        assert first.embedded == {"nats", "postgres", "redis"}
        with psycopg.connect(libpq_url(first.database_url), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
    with (
        Infra(tmp_path, persist=True, env={}) as second,
        psycopg.connect(libpq_url(second.database_url)) as conn,
    ):
        assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
