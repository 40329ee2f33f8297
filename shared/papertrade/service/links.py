"""A service's links to NATS, Postgres and Redis, each reconnecting on its own after a restart.

Links are opened in the background: a service is alive (`/healthz`) at once and ready (`/readyz`)
once the links it needs answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from papertrade.bus.connect import connect_nats
from papertrade.settings import Settings

_log = structlog.get_logger("papertrade.links")

LINK_NAMES = ("nats", "postgres", "redis")


class LinkDown(RuntimeError):
    """A link the call needs is not connected (yet); callers answer 503 or fail closed."""


class Links:
    def __init__(self, settings: Settings, name: str, needs: Iterable[str] = LINK_NAMES) -> None:
        self.settings = settings
        self.name = name
        self.needs = tuple(needs)
        unknown = set(self.needs) - set(LINK_NAMES)
        if unknown:
            raise ValueError(f"unknown links {sorted(unknown)}; known: {LINK_NAMES}")
        self._nats: NATS | None = None
        self._js: JetStreamContext | None = None
        self._engine: AsyncEngine | None = None
        self._redis: Redis | None = None
        self._nats_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    # --- access --------------------------------------------------------------------------------

    @property
    def nats(self) -> NATS:
        if self._nats is None or not self._nats.is_connected:
            raise LinkDown("nats is not connected")
        return self._nats

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise LinkDown("nats is not connected")
        return self._js

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise LinkDown("postgres link is not configured")
        return self._engine

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise LinkDown("redis link is not configured")
        return self._redis

    async def wait_nats(self, timeout: float | None = None) -> NATS:
        await asyncio.wait_for(self._nats_ready.wait(), timeout)
        assert self._nats is not None
        return self._nats

    # --- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Configure every link; NATS connects in the background until it succeeds."""
        if "postgres" in self.needs:
            self._engine = create_async_engine(
                self.settings.database_url,
                pool_pre_ping=True,
                pool_size=10,
                max_overflow=10,
                pool_recycle=1800,
            )
        if "redis" in self.needs:
            self._redis = Redis.from_url(
                self.settings.redis_url,
                decode_responses=False,
                socket_timeout=2.0,
                socket_connect_timeout=2.0,
                health_check_interval=10,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
            )
        if "nats" in self.needs:
            self._tasks.append(asyncio.create_task(self._connect_nats(), name=f"{self.name}-nats-connect"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._nats is not None:
            try:
                await asyncio.wait_for(self._nats.drain(), 5)
            except Exception:
                await self._nats.close()
        if self._redis is not None:
            await self._redis.aclose()
        if self._engine is not None:
            await self._engine.dispose()

    async def check(self, timeout: float = 2.0) -> dict[str, str]:
        """`{"nats": "ok" | what is wrong, ...}` for every link this service needs."""
        results: dict[str, str] = {}
        for name in self.needs:
            try:
                await asyncio.wait_for(self._check_one(name), timeout)
                results[name] = "ok"
            except TimeoutError:
                results[name] = f"no answer within {timeout:g}s"
            except Exception as exc:
                results[name] = str(exc) or type(exc).__name__
        return results

    async def _check_one(self, name: str) -> None:
        if name == "nats":
            await self.nats.flush(timeout=1)
        elif name == "redis":
            await self.redis.ping()
        elif name == "postgres":
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

    async def _connect_nats(self) -> None:
        delay = 0.2
        while True:
            try:
                self._nats = await connect_nats(self.settings.nats_url, self.name)
                self._js = self._nats.jetstream()
                self._nats_ready.set()
                _log.info("nats connected", url=_redact_url(self.settings.nats_url))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("nats connect failed, retrying", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _redact_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
