"""Test harness: real NATS (JetStream), Postgres and Redis for every test that needs them.

`NATS_URL` / `DATABASE_URL` / `REDIS_URL` when set, else embedded servers from the PyPI wheels,
started once per test session (papertrade.stack.infra, the same module `make up` uses).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from papertrade.stack.infra import Endpoints, Infra, create_database
from papertrade.stack.launch import launch
from papertrade.stack.procs import ManagedProcess
from papertrade.stack.services import spec

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    """NATS, Postgres and Redis for the whole session."""
    with Infra(tmp_path_factory.mktemp("infra")) as endpoints:
        yield endpoints


@pytest.fixture
def fresh_database_url(infra: Endpoints) -> str:
    """A new, empty database on the session's Postgres, for a test that must start clean."""
    return create_database(infra.database_url, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: the real market data files."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")
    return SHARED_DATA


ServiceStarter = Callable[..., tuple[ManagedProcess, str]]


@pytest.fixture
def start_services(infra: Endpoints, tmp_path: Path) -> Iterator[ServiceStarter]:
    """`start(name, **env) -> (process, base_url)`: a real service process on a free port, ready."""
    started: list[ManagedProcess] = []

    def start(name: str, database_url: str | None = None, **extra_env: str) -> tuple[ManagedProcess, str]:
        port_env = spec(name).port_env
        base = {**infra.env(), "PAPERTRADE_ADMIN_TOKEN": ADMIN_TOKEN, "LOG_LEVEL": "INFO"}
        if database_url:
            base["DATABASE_URL"] = database_url
        base.update(extra_env)
        port = int(extra_env[port_env]) if port_env in extra_env else None
        proc, url = launch(name, base, tmp_path / "logs", port=port)
        started.append(proc)
        return proc, url

    yield start
    for proc in reversed(started):
        proc.stop()
