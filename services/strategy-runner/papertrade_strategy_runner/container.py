"""`python -m papertrade_strategy_runner.container`: run ONE strategy from env until SIGTERM.

This is the strategy container's command, and also how the strategy-runner service runs each
deployment (one process per strategy: a strategy that hogs the CPU, leaks memory or crashes the
interpreter cannot stall or take down the others, and stop means SIGTERM, then SIGKILL).

Env:
  STRATEGY_ENTRYPOINT   package.module:Class (a papertrade.Strategy subclass)      required
  STRATEGY_PARAMS       JSON object of params                                       default {}
  STRATEGY_SYMBOLS      comma-separated symbols                                     required
  STRATEGY_INTERVAL     bar interval (1m 5m 15m 30m 1h 1d)                           default 1m
  APCA_API_KEY_ID / APCA_API_SECRET_KEY   the account's key pair                    required
  BROKER_URL            the broker (Alpaca v2 API)                                   default http://127.0.0.1:8000
  NATS_URL              bars (md.bar.<interval>.<symbol>) and trade updates         default nats://127.0.0.1:4222
  STRATEGY_ID / STRATEGY_NAME   labels for logs and status lines                    optional

What it does: checks the key pair (GET /v2/account gives the account id), warms each symbol's
history up from the JetStream MD stream (the bars published before it started; they fill
`history()` but do not reach `on_bar`), then delivers every new bar and every trade update of the
account (`broker.event.<account_id>`) to the strategy, in arrival order, on one worker thread. A
callback that raises pauses the strategy (status `error`, the traceback logged); the process keeps
running so the status stays visible. Every second, and on every change of state, it prints one JSON
line `{"pt_status": {...}}` on stdout (state, bars_seen, orders_sent, fills, pnl, last_error). Exit
codes: 0 after SIGTERM/SIGINT, 2 for a bad configuration (the reason on stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from papertrade import codec
from papertrade.bus import subjects
from papertrade.bus.connect import connect_nats
from papertrade.enums import Interval
from papertrade.errors import ValidationError
from papertrade.messages import TradeUpdate
from papertrade.models import Bar
from papertrade.strategy.driver import Driver, State
from papertrade.strategy.live import BrokerError, LiveContext
from papertrade.strategy.loader import StrategyLoadError, build_strategy
from papertrade.symbols import normalize_symbol

STATUS_KEY = "pt_status"


class ConfigError(ValueError):
    """The env does not describe a runnable strategy."""


@dataclass
class ContainerConfig:
    entrypoint: str
    params: dict[str, Any]
    symbols: tuple[str, ...]
    interval: Interval
    key_id: str
    secret: str
    broker_url: str
    nats_url: str
    strategy_id: str = ""
    name: str = ""
    status_interval: float = 1.0
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ContainerConfig:
        e = dict(os.environ if env is None else env)
        entrypoint = e.get("STRATEGY_ENTRYPOINT", "").strip()
        if not entrypoint:
            raise ConfigError("STRATEGY_ENTRYPOINT is not set (package.module:Class)")
        try:
            params = json.loads(e.get("STRATEGY_PARAMS") or "{}")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"STRATEGY_PARAMS is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise ConfigError("STRATEGY_PARAMS must be a JSON object")
        raw_symbols = [s for s in (e.get("STRATEGY_SYMBOLS") or "").split(",") if s.strip()]
        if not raw_symbols:
            raise ConfigError("STRATEGY_SYMBOLS is not set (comma-separated symbols)")
        try:
            symbols = tuple(dict.fromkeys(normalize_symbol(s, "STRATEGY_SYMBOLS") for s in raw_symbols))
            interval = Interval.parse(e.get("STRATEGY_INTERVAL") or "1m", "STRATEGY_INTERVAL")
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None
        key_id = e.get("APCA_API_KEY_ID", "")
        secret = e.get("APCA_API_SECRET_KEY", "")
        if not key_id or not secret:
            raise ConfigError("APCA_API_KEY_ID and APCA_API_SECRET_KEY must be set (the account's key pair)")
        return cls(
            entrypoint=entrypoint,
            params=params,
            symbols=symbols,
            interval=interval,
            key_id=key_id,
            secret=secret,
            broker_url=e.get("BROKER_URL") or "http://127.0.0.1:8000",
            nats_url=e.get("NATS_URL") or "nats://127.0.0.1:4222",
            strategy_id=e.get("STRATEGY_ID", ""),
            name=e.get("STRATEGY_NAME", ""),
            status_interval=float(e.get("STRATEGY_STATUS_INTERVAL") or 1.0),
        )


class StrategyProcess:
    """One strategy: NATS in, the Driver on a worker thread, status lines out."""

    def __init__(self, config: ContainerConfig, out: Any = None) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.strategy = build_strategy(config.entrypoint, config.params)
        self.ctx = LiveContext(config.broker_url, config.key_id, config.secret, interval=config.interval)
        self.driver = Driver(
            self.strategy, self.ctx, config.symbols, config.interval, on_error=self._on_error
        )
        self.events: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self.stopping = asyncio.Event()
        self._status_dirty = threading.Event()
        self._worker: threading.Thread | None = None
        self._last_status: dict[str, Any] | None = None
        self._fatal: str | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            account_id = await asyncio.to_thread(self.ctx.connect)
        except Exception as exc:
            self._fatal = f"cannot use the account's key pair at {self.config.broker_url}: {exc}"
            self._print_status()
            _err(self._fatal)
            return 2
        nc = await connect_nats(
            self.config.nats_url, f"strategy-{self.config.strategy_id or self.config.name}"
        )
        subs: list[Any] = []
        try:
            subs.append(await nc.subscribe(subjects.broker_event(account_id), cb=self._on_update_msg))
            for symbol in self.config.symbols:
                subs.append(await self._subscribe_bars(nc, symbol))
            self._worker = threading.Thread(target=self._work, name="strategy", daemon=True)
            self._worker.start()
            while not self.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.config.status_interval)
                self._print_status()
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self.events.put(None)
            if self._worker is not None:
                await asyncio.to_thread(self._worker.join, 10.0)
            self._print_status(final=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5)
            self.ctx.close()
        return 0

    def stop(self) -> None:
        self.stopping.set()

    # --- NATS ------------------------------------------------------------------------------------

    async def _subscribe_bars(self, nc: Any, symbol: str) -> Any:
        """An ordered JetStream consumer over the symbol's bars: what the MD stream held when we
        started is history (warm-up), the rest is live. Without the stream: a plain subscription."""
        subject = subjects.md_bar(self.config.interval, symbol)
        js = nc.jetstream()
        try:
            info = await js.stream_info(subjects.STREAM_MD)
            start_seq = int(info.state.last_seq)
        except Exception:
            return await nc.subscribe(subject, cb=self._on_live_bar_msg)

        async def on_msg(msg: Any) -> None:
            seq = msg.metadata.sequence.stream if msg.metadata is not None else start_seq + 1
            self.events.put(("bar" if seq > start_seq else "warm", msg.data))

        from nats.js.api import DeliverPolicy

        return await js.subscribe(subject, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)

    async def _on_live_bar_msg(self, msg: Any) -> None:
        self.events.put(("bar", msg.data))

    async def _on_update_msg(self, msg: Any) -> None:
        self.events.put(("update", msg.data))

    # --- the worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        driver = self.driver
        ctx = self.ctx
        driver.start()
        self._deliver_pending()
        self._status_dirty.set()
        while True:
            item = self.events.get()
            if item is None:
                break
            kind, data = item
            try:
                if kind == "update":
                    update = codec.decode(data, TradeUpdate)
                    ctx.on_update(update)
                    driver.update(update)
                else:
                    bar = codec.decode(data, Bar)
                    if ctx.on_bar(bar) and kind == "bar":
                        driver.bar(bar)
            except ValidationError as exc:
                _err(f"skipping a malformed {kind} message: {exc}")
                continue
            except BrokerError as exc:
                driver._failed(kind, exc)
            self._deliver_pending()
        if driver.state is State.RUNNING:
            driver.stop()
            self._deliver_pending()

    def _deliver_pending(self) -> None:
        ctx = self.ctx
        while ctx.pending_updates:
            updates = ctx.pending_updates
            ctx.pending_updates = []
            for u in updates:
                self.driver.update(u)

    def _on_error(self, message: str, tb: str) -> None:
        _err(f"strategy paused after an error: {message}\n{tb}")
        self._status_dirty.set()

    # --- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        d = self.driver
        state = "error" if self._fatal else d.state.value
        try:
            pnl = self.ctx.pnl()
        except Exception:
            pnl = Decimal(0)
        return {
            "id": self.config.strategy_id,
            "name": self.config.name,
            "entrypoint": self.config.entrypoint,
            "status": state,
            "bars_seen": d.bars_seen,
            "orders_sent": d.orders_sent,
            "fills": d.fills,
            "pnl": str(pnl.quantize(Decimal("0.01"))),
            "last_error": self._fatal or d.last_error,
        }

    def _print_status(self, final: bool = False) -> None:
        status = self.status()
        if final and status["status"] == "running":
            status["status"] = "stopped"
        if status == self._last_status and not self._status_dirty.is_set() and not final:
            return
        self._status_dirty.clear()
        self._last_status = status
        self.out.write(json.dumps({STATUS_KEY: status, "t": time.time()}) + "\n")
        self.out.flush()


def main(argv: list[str] | None = None) -> int:
    _configure_logs()
    try:
        config = ContainerConfig.from_env()
        proc = StrategyProcess(config)
    except (ConfigError, StrategyLoadError) as exc:
        _err(f"cannot start the strategy: {exc}")
        return 2

    async def _run() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, proc.stop)
        return await proc.run()

    return asyncio.run(_run())


def _configure_logs() -> None:
    """Logs go to stderr as JSON lines (stdout carries only the status lines). Deliberately not the
    services' logging setup: that imports the web stack, which a strategy process does not need."""
    import logging

    import structlog

    level = getattr(logging, os.environ.get("LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=level, format="%(levelname)s %(name)s %(message)s")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )


def _err(message: str) -> None:
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
