"""One way to connect to NATS: reconnect forever, named, with logged state changes."""

from __future__ import annotations

import nats
import structlog
from nats.aio.client import Client as NATS

_log = structlog.get_logger("papertrade.bus")


async def connect_nats(url: str, name: str, *, connect_timeout: float = 2.0) -> NATS:
    """Connect to `url` and keep reconnecting after the server goes away (never give up)."""

    async def _disconnected() -> None:
        _log.warning("nats disconnected", client=name)

    async def _reconnected() -> None:
        _log.info("nats reconnected", client=name)

    async def _error(exc: Exception) -> None:
        _log.warning("nats error", client=name, error=str(exc))

    return await nats.connect(
        servers=[url],
        name=name,
        connect_timeout=connect_timeout,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        ping_interval=5,
        max_outstanding_pings=3,
        pending_size=64 * 1024 * 1024,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
        error_cb=_error,
    )
