"""Deployments and their processes: one `python -m papertrade_strategy_runner.container` per strategy.

Why a process per strategy (not a task): a strategy is user code. In its own process it cannot block
the others' event loop or hold their GIL, a crash (even of the interpreter) or a leak stays its own,
and stop is a signal the runner can always deliver (SIGTERM, then SIGKILL). It is also exactly the
strategy container, so "deployed in the runner" and "run as a container" are one code path. The
price, ~60 MB and ~1 s of start-up per strategy, is small next to a strategy's life.

The child reports its status as JSON lines on stdout (`{"pt_status": {...}}`); the supervisor keeps
the latest in memory and in Postgres (throttled), so `GET /v1/strategies/{id}` is answered from
memory and a restarted runner shows the last counters and resumes what should run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import httpx
import structlog
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from papertrade.settings import Settings
from papertrade.timeutil import iso, utcnow
from papertrade_strategy_runner.container import STATUS_KEY
from papertrade_strategy_runner.tables import deployments

_log = structlog.get_logger("strategy-runner.supervisor")

#: Persist a running deployment's counters at most this often (seconds).
PERSIST_EVERY = 2.0


class BrokerUnavailable(RuntimeError):
    """The broker's admin API did not answer."""


class UnknownAccount(ValueError):
    pass


@dataclass
class Deployment:
    id: UUID
    name: str
    entrypoint: str
    params: dict[str, Any]
    symbols: list[str]
    interval: str
    account_id: UUID
    desired: str
    status: str
    bars_seen: int = 0
    orders_sent: int = 0
    fills: int = 0
    pnl: Decimal = Decimal(0)
    last_error: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    #: counters of earlier processes of this deployment (a new process counts from 0)
    base: tuple[int, int, int, Decimal] = (0, 0, 0, Decimal(0))

    def view(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "entrypoint": self.entrypoint,
            "params": self.params,
            "symbols": self.symbols,
            "interval": self.interval,
            "account_id": str(self.account_id),
            "status": self.status,
            "bars_seen": self.bars_seen,
            "orders_sent": self.orders_sent,
            "fills": self.fills,
            "pnl": format(self.pnl.quantize(Decimal("0.01")), "f"),
            "last_error": self.last_error,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "entrypoint": self.entrypoint,
            "params": self.params,
            "symbols": self.symbols,
            "interval": self.interval,
            "account_id": self.account_id,
            "desired": self.desired,
            "status": self.status,
            "bars_seen": self.bars_seen,
            "orders_sent": self.orders_sent,
            "fills": self.fills,
            "pnl": self.pnl,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


class _Child:
    """One running strategy process and the tasks reading its output."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr: deque[str] = deque(maxlen=40)
        self.stopping = False
        self.tasks: list[asyncio.Task[Any]] = []


class Supervisor:
    def __init__(self, settings: Settings, engine: AsyncEngine, python: str = sys.executable) -> None:
        self.settings = settings
        self.engine = engine
        self.python = python
        self.deployments: dict[UUID, Deployment] = {}
        self.children: dict[UUID, _Child] = {}
        self._persisted: dict[UUID, float] = {}
        self._lock = asyncio.Lock()
        self._http = httpx.AsyncClient(timeout=10.0)

    # --- lifecycle -------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read every deployment; start those that should run (the runner restarted)."""
        async with self.engine.connect() as conn:
            rows = (
                (await conn.execute(select(deployments).order_by(deployments.c.created_at))).mappings().all()
            )
        for r in rows:
            dep = Deployment(
                id=r["id"],
                name=r["name"],
                entrypoint=r["entrypoint"],
                params=dict(r["params"] or {}),
                symbols=list(r["symbols"] or []),
                interval=r["interval"],
                account_id=r["account_id"],
                desired=r["desired"],
                status=r["status"],
                bars_seen=r["bars_seen"],
                orders_sent=r["orders_sent"],
                fills=r["fills"],
                pnl=Decimal(r["pnl"]),
                last_error=r["last_error"],
                created_at=r["created_at"],
                updated_at=r["updated_at"],
            )
            self.deployments[dep.id] = dep
        for dep in list(self.deployments.values()):
            if dep.desired == "running":
                try:
                    await self.start(dep)
                except Exception as exc:
                    dep.status = "error"
                    dep.last_error = f"could not resume after a restart: {exc}"
                    await self._persist(dep)

    async def close(self) -> None:
        """Stop every process (their deployments stay `running` in the table: they resume)."""
        await asyncio.gather(
            *(self._terminate(dep_id) for dep_id in list(self.children)), return_exceptions=True
        )
        for dep in self.deployments.values():
            await self._persist(dep, force=True)
        await self._http.aclose()

    # --- broker ------------------------------------------------------------------------------------

    async def check_account(self, account_id: UUID) -> None:
        r = await self._admin("GET", f"/admin/accounts/{account_id}")
        if r.status_code == 404:
            raise UnknownAccount(f"unknown account {account_id}: the broker has no such account")
        if r.status_code != 200:
            raise BrokerUnavailable(
                f"the broker answered {r.status_code} for account {account_id}: {r.text[:200]}"
            )

    async def _keys(self, account_id: UUID) -> tuple[str, str]:
        r = await self._admin("POST", f"/admin/accounts/{account_id}/keys")
        if r.status_code == 404:
            raise UnknownAccount(f"unknown account {account_id}: the broker has no such account")
        if r.status_code not in (200, 201):
            raise BrokerUnavailable(f"the broker did not mint a key pair ({r.status_code}): {r.text[:200]}")
        data = r.json()
        return str(data["api_key_id"]), str(data["api_secret_key"])

    async def _admin(self, method: str, path: str) -> httpx.Response:
        token = self.settings.admin_token_value or ""
        try:
            return await self._http.request(
                method,
                self.settings.broker_url.rstrip("/") + path,
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(
                f"the broker at {self.settings.broker_url} is unreachable: {exc}"
            ) from None

    # --- deployments -----------------------------------------------------------------------------

    async def create(self, dep: Deployment) -> Deployment:
        async with self.engine.begin() as conn:
            await conn.execute(insert(deployments).values(**dep.row()))
        self.deployments[dep.id] = dep
        return dep

    async def start(self, dep: Deployment) -> None:
        """Start the deployment's process (a no-op if it runs)."""
        async with self._lock:
            child = self.children.get(dep.id)
            if child is not None and child.proc.returncode is None:
                return
            key_id, secret = await self._keys(dep.account_id)
            env = {
                **os.environ,
                "STRATEGY_ENTRYPOINT": dep.entrypoint,
                "STRATEGY_PARAMS": json.dumps(dep.params),
                "STRATEGY_SYMBOLS": ",".join(dep.symbols),
                "STRATEGY_INTERVAL": dep.interval,
                "STRATEGY_ID": str(dep.id),
                "STRATEGY_NAME": dep.name,
                "APCA_API_KEY_ID": key_id,
                "APCA_API_SECRET_KEY": secret,
                "BROKER_URL": self.settings.broker_url,
                "NATS_URL": self.settings.nats_url,
                "PYTHONUNBUFFERED": "1",
            }
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "papertrade_strategy_runner.container",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            child = _Child(proc)
            self.children[dep.id] = child
            dep.base = (dep.bars_seen, dep.orders_sent, dep.fills, dep.pnl)
            dep.desired = "running"
            dep.status = "running"
            dep.updated_at = utcnow()
            child.tasks = [
                asyncio.create_task(self._read_status(dep, child), name=f"strategy-{dep.id}-stdout"),
                asyncio.create_task(self._read_stderr(dep, child), name=f"strategy-{dep.id}-stderr"),
                asyncio.create_task(self._watch(dep, child), name=f"strategy-{dep.id}-watch"),
            ]
            _log.info("strategy started", id=str(dep.id), name=dep.name, pid=proc.pid)
        await self._persist(dep, force=True)

    async def stop(self, dep: Deployment) -> None:
        dep.desired = "stopped"
        await self._terminate(dep.id)
        dep.status = "stopped"
        dep.updated_at = utcnow()
        await self._persist(dep, force=True)

    async def delete(self, dep: Deployment) -> None:
        dep.desired = "stopped"
        await self._terminate(dep.id)
        async with self.engine.begin() as conn:
            await conn.execute(delete(deployments).where(deployments.c.id == dep.id))
        self.deployments.pop(dep.id, None)
        self._persisted.pop(dep.id, None)

    # --- internals -------------------------------------------------------------------------------

    async def _terminate(self, dep_id: UUID, timeout: float = 10.0) -> None:
        child = self.children.get(dep_id)
        if child is None:
            return
        child.stopping = True
        proc = child.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await asyncio.gather(*child.tasks, return_exceptions=True)
        self.children.pop(dep_id, None)

    async def _read_status(self, dep: Deployment, child: _Child) -> None:
        assert child.proc.stdout is not None
        async for raw in child.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("{"):
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            status = data.get(STATUS_KEY) if isinstance(data, dict) else None
            if not isinstance(status, dict):
                continue
            bars, orders, fills, pnl = dep.base
            dep.bars_seen = bars + int(status.get("bars_seen", 0))
            dep.orders_sent = orders + int(status.get("orders_sent", 0))
            dep.fills = fills + int(status.get("fills", 0))
            dep.pnl = pnl + Decimal(str(status.get("pnl", "0")))
            reported = status.get("status")
            if reported in ("running", "stopped", "error") and not (child.stopping and reported == "running"):
                dep.status = reported
            if status.get("last_error"):
                dep.last_error = str(status["last_error"])
            dep.updated_at = utcnow()
            await self._persist(dep)

    async def _read_stderr(self, dep: Deployment, child: _Child) -> None:
        assert child.proc.stderr is not None
        async for raw in child.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                child.stderr.append(line)
                _log.info("strategy output", id=str(dep.id), name=dep.name, line=line[:2000])

    async def _watch(self, dep: Deployment, child: _Child) -> None:
        rc = await child.proc.wait()
        await asyncio.gather(*child.tasks[:2], return_exceptions=True)
        if child.stopping:
            dep.status = "stopped"
        elif rc != 0 or dep.status == "running":
            dep.status = "error"
            tail = " | ".join(list(child.stderr)[-5:])
            dep.last_error = f"the strategy process exited with code {rc}" + (f": {tail}" if tail else "")
            _log.warning("strategy process exited", id=str(dep.id), code=rc, tail=tail)
        dep.updated_at = utcnow()
        await self._persist(dep, force=True)

    async def _persist(self, dep: Deployment, force: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        if not force and now - self._persisted.get(dep.id, 0.0) < PERSIST_EVERY:
            return
        if dep.id not in self.deployments:
            return
        self._persisted[dep.id] = now
        values = dep.row()
        values.pop("id")
        values.pop("created_at")
        try:
            async with self.engine.begin() as conn:
                await conn.execute(update(deployments).where(deployments.c.id == dep.id).values(**values))
        except Exception as exc:
            _log.warning("could not persist a deployment's status", id=str(dep.id), error=str(exc))
