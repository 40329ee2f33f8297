"""`make up`: the whole stack as local processes, supervised, stopped cleanly.

    with Stack(Path(".papertrade")) as stack:      # infra + the five services, ready
        stack.urls["broker"]                        # http://127.0.0.1:8000

`Stack` starts NATS, Postgres and Redis (or adopts `NATS_URL` / `DATABASE_URL` / `REDIS_URL`), then the
services of `papertrade.stack.services` in `START_ORDER`, each gated on its `/readyz`; restarts a
service that crashes (exponential backoff, reported as an event); runs the demo hook; writes
`stack.env`; and on `stop()` stops the services in reverse order, then the infra it started.

What each service gets (module, port, env) is `plan_services()`, derived from the one `SERVICES` table;
the test of docker-compose.yml compares the compose file with that plan, so both describe one stack.
The console (rich status table, live feed of WARNING+ log lines and lifecycle events) is `main()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx

from papertrade.stack.demo import DemoContext, DemoHook, DemoResult, run_demo
from papertrade.stack.infra import Endpoints, Infra
from papertrade.stack.launch import service_env, start_service
from papertrade.stack.procs import ManagedProcess, free_port, port_open
from papertrade.stack.services import COMMON_ENV, DEPENDS_ON, SERVICES, START_ORDER, ServiceSpec, spec

DEFAULT_DATA_DIR = Path(".papertrade")
STACK_ENV_FILE = "stack.env"
ADMIN_TOKEN_FILE = "admin_token"
LOCK_FILE = "stack.lock"
LOCAL_HOST = "127.0.0.1"

#: restart delays after a crash, in seconds (the last one repeats); reset after STABLE_AFTER s up
RESTART_BACKOFF: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_AFTER = 60.0

# service states
STARTING = "starting"
READY = "ready"
CRASHED = "crashed"
RESTARTING = "restarting"
STOPPING = "stopping"
STOPPED = "stopped"


class StackError(RuntimeError):
    """The stack could not start (a port in use, a service that never became ready, ...)."""


class StackInterrupted(StackError):
    """`request_stop()` (Ctrl-C) came while the stack was starting."""


@dataclass(frozen=True)
class ServicePlan:
    """How the runner starts one service: `python -m <module>` with `env`, serving on `port`."""

    spec: ServiceSpec
    port: int
    #: the service's own env (on top of the runner's environment): COMMON_ENV, <SERVICE>_PORT,
    #: <SERVICE>_HOST and every service's URL
    env: dict[str, str]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def module(self) -> str:
        return self.spec.module

    @property
    def url(self) -> str:
        return f"http://{LOCAL_HOST}:{self.port}"


@dataclass(frozen=True)
class StackEvent:
    """A lifecycle event or a WARNING+ log line of one process of the stack."""

    source: str
    level: str  # "info" | "warning" | "error"
    message: str
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class StatusRow:
    name: str
    kind: str  # "service" | "infra"
    url: str
    state: str
    pid: int | None


def restart_delay(crashes: int) -> float:
    """Seconds to wait before restarting a service that has crashed `crashes` times in a row before."""
    return RESTART_BACKOFF[min(max(crashes, 0), len(RESTART_BACKOFF) - 1)]


def resolve_ports(env: Mapping[str, str], *, free: bool = False) -> dict[str, int]:
    """Each service's port: a free one if `free`, else `<SERVICE>_PORT` from `env`, else the default."""
    if free:
        return {s.name: free_port() for s in SERVICES}
    ports: dict[str, int] = {}
    for s in SERVICES:
        raw = env.get(s.port_env) or str(s.port)
        try:
            ports[s.name] = int(raw)
        except ValueError as exc:
            raise StackError(f"{s.port_env}={raw!r} is not a port number") from exc
    return ports


def plan_services(
    base_env: Mapping[str, str], ports: Mapping[str, int] | None = None, host: str = LOCAL_HOST
) -> list[ServicePlan]:
    """The services in start order, each with its port and env. `base_env` holds COMMON_ENV's values."""
    missing = [k for k in COMMON_ENV if k not in base_env]
    if missing:
        raise StackError(f"the services need {', '.join(missing)}")
    ports = dict(ports or {})
    all_ports = {s.name: ports.get(s.name, s.port) for s in SERVICES}
    plans = []
    for name in START_ORDER:
        s = spec(name)
        env = service_env(s, {k: base_env[k] for k in COMMON_ENV}, all_ports)
        env[f"{s.env_prefix}_HOST"] = host
        plans.append(ServicePlan(s, all_ports[name], env))
    return plans


def admin_token(data_dir: Path, env: Mapping[str, str]) -> str:
    """`PAPERTRADE_ADMIN_TOKEN` (or the file `PAPERTRADE_ADMIN_TOKEN_FILE`) if set, else the token kept
    in `<data_dir>/admin_token` (made once, mode 600)."""
    given = env.get("PAPERTRADE_ADMIN_TOKEN", "").strip()
    if not given and env.get("PAPERTRADE_ADMIN_TOKEN_FILE"):
        try:
            given = Path(env["PAPERTRADE_ADMIN_TOKEN_FILE"]).read_text().strip()
        except OSError as exc:
            raise StackError(f"PAPERTRADE_ADMIN_TOKEN_FILE: {exc}") from exc
    if given:
        return given
    path = data_dir / ADMIN_TOKEN_FILE
    with contextlib.suppress(OSError):
        kept = path.read_text().strip()
        if kept:
            return kept
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class Stack:
    """The local stack: infra plus the five services, supervised. A context manager.

    `env` (default: os.environ) supplies NATS_URL / DATABASE_URL / REDIS_URL (unset: embedded servers
    under `data_dir`), PAPERTRADE_ADMIN_TOKEN, LOG_LEVEL and `<SERVICE>_PORT`; every service process
    gets it too, under its plan (so service options set there reach the services). `free_ports` picks
    free ports instead (for tests), `ports` sets some. `demo` runs once all services are ready (None:
    no demo). `persist=False` runs embedded Postgres without fsync (tests). `services` runs a subset.
    Services start in START_ORDER, each once the services it depends on (DEPENDS_ON, the same table as
    compose's depends_on) are ready; `sequential` waits for every previous one instead.

        with Stack(tmp_path, env={**infra.env(), "PAPERTRADE_ADMIN_TOKEN": "t"}, free_ports=True,
                   persist=False, demo=None) as stack:
            httpx.get(stack.urls["broker"] + "/v2/clock", ...)
    """

    def __init__(
        self,
        data_dir: Path = DEFAULT_DATA_DIR,
        *,
        env: Mapping[str, str] | None = None,
        ports: Mapping[str, int] | None = None,
        free_ports: bool = False,
        persist: bool = True,
        demo: DemoHook | None = run_demo,
        on_event: Callable[[StackEvent], None] | None = None,
        restart: bool = True,
        ready_timeout: float = 120.0,
        watch_logs: bool = True,
        services: Sequence[str] | None = None,
        sequential: bool = False,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.env = dict(os.environ if env is None else env)
        self.persist = persist
        self.demo = demo
        self.on_event = on_event
        self.restart = restart
        self.ready_timeout = ready_timeout
        self.watch_logs = watch_logs
        #: the services to run (default all), always started in START_ORDER
        self.only = None if services is None else {spec(n).name for n in services}
        #: start each service only once the one before it in START_ORDER is ready; default: once the
        #: services it depends on (DEPENDS_ON) are ready, the others together
        self.sequential = sequential
        self.log_dir = self.data_dir / "logs"
        self.events: deque[StackEvent] = deque(maxlen=1000)
        self.demo_result: DemoResult | None = None
        self.endpoints: Endpoints | None = None
        self.admin_token = ""
        self.plans: list[ServicePlan] = []
        self.startup_seconds: float | None = None
        ports = dict(ports or {})
        self._ports = {**resolve_ports(self.env, free=free_ports), **ports}
        self._infra: Infra | None = None
        self._procs: dict[str, ManagedProcess] = {}
        self._states: dict[str, str] = {}
        self._started_at: dict[str, float] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._feed: _LogFeed | None = None
        self._lockfile: IO[str] | None = None
        self._extra_env: dict[str, str] = {}

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Stack:
        """Start infra and services (readiness-gated), run the demo, write stack.env. Raises StackError."""
        t0 = time.monotonic()
        try:
            self._start(t0)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the services in reverse start order, then the infra this stack started. Idempotent."""
        self._stopping.set()
        if self._feed is not None:
            self._feed.quiet = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.join()  # the supervisor stops the services itself (see _supervise)
        else:
            self._stop_services()
        if self._feed is not None:
            self._feed.stop()
            self._feed = None
        infra, self._infra = self._infra, None
        if infra is not None:
            self._emit("stack", "info", "stopping infra")
            infra.stop()
        if self._lockfile is not None:  # only the stack holding the data dir owns its stack.env
            with contextlib.suppress(OSError):
                (self.data_dir / STACK_ENV_FILE).unlink()
            self._lockfile.close()
            self._lockfile = None

    def request_stop(self) -> None:
        """Ask the stack to stop (safe from a signal handler): a start in progress gives up at its next
        step (StackInterrupted), the supervisor stops restarting; call `stop()` to finish."""
        self._stopping.set()

    @property
    def stop_requested(self) -> bool:
        return self._stopping.is_set()

    # --- what is running -----------------------------------------------------------------------

    @property
    def urls(self) -> dict[str, str]:
        """Service name -> base URL."""
        return {p.name: p.url for p in self.plans}

    @property
    def states(self) -> dict[str, str]:
        with self._lock:
            return dict(self._states)

    def pids(self) -> dict[str, int]:
        """Every child process of the stack by name (services and embedded infra) that is alive."""
        out: dict[str, int] = {}
        with self._lock:
            procs = dict(self._procs)
        if self._infra is not None:
            procs.update({f"infra:{k}": v for k, v in self._infra.procs.items()})
        for name, proc in procs.items():
            if proc.alive() and proc.pid is not None:
                out[name] = proc.pid
        return out

    def status(self) -> list[StatusRow]:
        rows: list[StatusRow] = []
        with self._lock:
            for p in self.plans:
                proc = self._procs.get(p.name)
                pid = proc.pid if proc is not None and proc.alive() else None
                rows.append(StatusRow(p.name, "service", p.url, self._states.get(p.name, "?"), pid))
        if self.endpoints is not None:
            for name, url in (
                ("nats", self.endpoints.nats_url),
                ("postgres", self.endpoints.database_url),
                ("redis", self.endpoints.redis_url),
            ):
                proc = self._infra.procs.get(name) if self._infra is not None else None
                embedded = name in self.endpoints.embedded
                state = ("embedded" if embedded else "external") + (
                    "" if not embedded or (proc is not None and proc.alive()) else " (down)"
                )
                pid = proc.pid if proc is not None and proc.alive() else None
                rows.append(StatusRow(name, "infra", _hide_password(url), state, pid))
        return rows

    def stack_env(self) -> dict[str, str]:
        """The `KEY=value` lines of stack.env: every URL, the admin token, the demo's extra lines."""
        assert self.endpoints is not None
        out = {p.spec.url_env: p.url for p in self.plans}
        out.update(self.endpoints.env())
        out["PAPERTRADE_ADMIN_TOKEN"] = self.admin_token
        out.update(self._extra_env)
        return out

    # --- internals -----------------------------------------------------------------------------

    def _start(self, t0: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        with contextlib.suppress(OSError):
            (self.data_dir / STACK_ENV_FILE).unlink()
        self._check_ports()
        self.admin_token = admin_token(self.data_dir, self.env)
        if self.watch_logs:
            self._feed = _LogFeed(self.log_dir, self._emit)
            self._feed.start()
        self._emit("stack", "info", f"data under {self.data_dir}")
        self._infra = Infra(self.data_dir, persist=self.persist, env=self.env)
        try:
            self.endpoints = self._infra.start()
        except Exception as exc:
            raise StackError(
                f"NATS/Postgres/Redis did not start: {type(exc).__name__}: {exc} (logs: {self.log_dir})"
            ) from exc
        self._raise_if_stopping()
        self._emit(
            "stack",
            "info",
            "infra up: "
            + ", ".join(
                f"{n} ({'embedded' if n in self.endpoints.embedded else 'external'})"
                for n in ("nats", "postgres", "redis")
            ),
        )
        base = {
            **self.endpoints.env(),
            "PAPERTRADE_ADMIN_TOKEN": self.admin_token,
            "LOG_LEVEL": self.env.get("LOG_LEVEL") or "INFO",
        }
        self.plans = [p for p in plan_services(base, self._ports) if self.only is None or p.name in self.only]
        by_name = {p.name: p for p in self.plans}
        for i, plan in enumerate(self.plans):
            self._raise_if_stopping()
            needs = [self.plans[i - 1].name] if self.sequential and i else DEPENDS_ON.get(plan.name, ())
            for dep in needs:
                if dep in by_name:
                    self._gate_ready(by_name[dep])
            self._start_one(plan)
        for plan in self.plans:
            self._gate_ready(plan)
        if self.demo is not None:
            self._raise_if_stopping()
            self.demo_result = self.demo(DemoContext(self.urls, self.admin_token, self.data_dir))
            self._extra_env.update(self.demo_result.env)
            for note in self.demo_result.notes:
                self._emit("demo", "info", note)
            for why in self.demo_result.skipped:
                self._emit("demo", "warning", f"skipped: {why}")
        self._raise_if_stopping()
        self._write_stack_env()
        self.startup_seconds = time.monotonic() - t0
        if self.restart:
            self._supervisor = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
            self._supervisor.start()

    def _gate_ready(self, plan: ServicePlan) -> None:
        """Wait until a starting service is ready (no-op if it is); StackError if it never is."""
        if self._states.get(plan.name) == READY:
            return
        took = self._wait_ready(plan, self.ready_timeout)
        self._raise_if_stopping()
        if took is None:
            proc = self._procs[plan.name]
            what = (
                f"exited with code {proc.returncode()}"
                if not proc.alive()
                else f"did not become ready within {self.ready_timeout:g}s"
            )
            raise StackError(f"{plan.name} {what} (log: {proc.log_path}):\n{proc.tail(40)}")
        self._set_state(plan.name, READY)
        self._emit(plan.name, "info", f"ready at {plan.url} in {took:.1f}s")

    def _take_lock(self) -> None:
        f = open(self.data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the stack's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            other = f.read().strip() or "?"
            f.close()
            raise StackError(
                f"another stack runs on {self.data_dir} (pid {other}); stop it or use another --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lockfile = f

    def _check_ports(self) -> None:
        wanted = [s for s in SERVICES if self.only is None or s.name in self.only]
        busy = [s for s in wanted if port_open(LOCAL_HOST, self._ports[s.name])]
        if busy:
            what = ", ".join(f"{s.name} {self._ports[s.name]}" for s in busy)
            raise StackError(
                f"port(s) already in use: {what}. Stop what listens there, move a service with "
                f"<SERVICE>_PORT (e.g. {busy[0].port_env}), or use --free-ports"
            )

    def _start_one(self, plan: ServicePlan) -> ManagedProcess:
        # the stack's environment (service options such as the streamer's feed settings) under the plan
        proc = start_service(plan.spec, {**self.env, **plan.env}, self.log_dir)
        with self._lock:
            self._procs[plan.name] = proc
            self._states[plan.name] = STARTING
            self._started_at[plan.name] = time.monotonic()
        self._emit(plan.name, "info", f"started (pid {proc.pid})")
        return proc

    def _wait_ready(self, plan: ServicePlan, timeout: float) -> float | None:
        """Seconds until `/readyz` answered 200; None if it died, timed out or the stack is stopping."""
        proc = self._procs[plan.name]
        start = self._started_at.get(plan.name, time.monotonic())  # since the process was launched
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() - start < timeout and not self._stopping.is_set():
                if not proc.alive():
                    return None
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{plan.url}/readyz").status_code == 200:
                        return time.monotonic() - start
                self._stopping.wait(0.1)
        return None

    def _supervise(self) -> None:
        """Restart crashed services with backoff until stop(); then stop the services (this thread
        started the restarted ones, and PDEATHSIG ties a child to the thread that started it)."""
        crashes: dict[str, int] = {}
        restart_at: dict[str, float] = {}
        up_since: dict[str, float] = {p.name: time.monotonic() for p in self.plans}

        def crashed(name: str, what: str) -> None:
            now = time.monotonic()
            if now - up_since.get(name, now) > STABLE_AFTER:
                crashes[name] = 0
            n = crashes.get(name, 0)
            crashes[name] = n + 1
            delay = restart_delay(n)
            restart_at[name] = now + delay
            up_since[name] = now
            self._set_state(name, CRASHED)
            log = self._procs[name].log_path
            self._emit(name, "error", f"{what}; restart #{n + 1} in {delay:g}s (log: {log})")

        try:
            while not self._stopping.wait(0.25):
                for plan in self.plans:
                    name = plan.name
                    state = self._states.get(name)
                    proc = self._procs[name]
                    if state == READY and not proc.alive():
                        crashed(name, f"exited with code {proc.returncode()}")
                    elif state == CRASHED and time.monotonic() >= restart_at[name]:
                        proc.stop()
                        self._start_one(plan)
                        self._set_state(name, RESTARTING)
                        took = self._wait_ready(plan, self.ready_timeout)
                        if self._stopping.is_set():
                            break
                        if took is None:
                            self._procs[name].stop(timeout=5)
                            crashed(name, "restart failed: not ready")
                            continue
                        up_since[name] = time.monotonic()
                        self._set_state(name, READY)
                        self._emit(name, "warning", f"restarted, ready again in {took:.1f}s")
        finally:
            self._stop_services()

    def _stop_services(self) -> None:
        for plan in reversed(self.plans):
            with self._lock:
                proc = self._procs.get(plan.name)
            if proc is None:
                continue
            if proc.alive():
                self._set_state(plan.name, STOPPING)
                self._emit(plan.name, "info", "stopping")
                proc.stop(timeout=15)
            else:
                proc.stop()
            self._set_state(plan.name, STOPPED)

    def _set_state(self, name: str, state: str) -> None:
        with self._lock:
            self._states[name] = state

    def _raise_if_stopping(self) -> None:
        if self._stopping.is_set():
            raise StackInterrupted("stopped while starting")

    def _write_stack_env(self) -> None:
        path = self.data_dir / STACK_ENV_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# papertrade stack (written by `make up`; removed when it stops)\n")
            for key, value in self.stack_env().items():
                f.write(f"{key}={value}\n")
        tmp.replace(path)

    def _emit(self, source: str, level: str, message: str) -> None:
        event = StackEvent(source, level, message)
        self.events.append(event)
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(event)


# --- the console (`python -m papertrade.stack up`) ------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m papertrade.stack up [--data-dir DIR] [--no-demo] [--free-ports]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m papertrade.stack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the stack in the foreground until Ctrl-C")
    up.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="data, logs, stack.env")
    up.add_argument("--no-demo", action="store_true", help="do not set up the demo")
    up.add_argument("--free-ports", action="store_true", help="serve on free ports, not 8000-8004")
    up.add_argument("--no-restart", action="store_true", help="do not restart a service that crashes")
    up.add_argument(
        "--sequential",
        action="store_true",
        help="start each service only once the previous one is ready (default: once its dependencies are)",
    )
    up.add_argument("--ready-timeout", type=float, default=120.0, help="seconds per service (default 120)")
    args = parser.parse_args(argv)
    return _up(args)


def _up(args: Any) -> int:
    from rich.console import Console

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    printer = _EventPrinter(console)
    stack = Stack(
        args.data_dir,
        free_ports=args.free_ports,
        demo=None if args.no_demo else run_demo,
        on_event=printer,
        restart=not args.no_restart,
        ready_timeout=args.ready_timeout,
        sequential=args.sequential,
    )

    def _on_signal(signum: int, frame: Any) -> None:
        # no exception from here: the main thread notices at its next check and stops in order
        if stack.stop_requested:
            printer(StackEvent("stack", "info", "already stopping..."))
            return
        printer(StackEvent("stack", "info", f"{signal.Signals(signum).name}: stopping"))
        stack.request_stop()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    code = 0
    try:
        console.rule("[bold]papertrade[/bold]")
        stack.start()
        _print_ready(console, stack)
        while not stack.stop_requested:
            time.sleep(0.5)
        console.print("[bold]stopping[/bold] (services in reverse order, then infra)...")
    except StackInterrupted:
        console.print("[bold]stopped before the stack was ready[/bold]")
    except StackError as exc:
        console.print(f"[bold red]papertrade could not start:[/bold red] {exc}")
        code = 1
    finally:
        stack.stop()
    if code == 0:
        console.print("[bold]papertrade stopped.[/bold]")
    return code


def _print_ready(console: Any, stack: Stack) -> None:
    from rich.table import Table

    table = Table(title="papertrade stack", title_justify="left")
    table.add_column("service")
    table.add_column("URL")
    table.add_column("state")
    table.add_column("pid", justify="right")
    for row in stack.status():
        color = "green" if row.state in (READY, "embedded", "external") else "red"
        table.add_row(row.name, row.url, f"[{color}]{row.state}[/{color}]", str(row.pid or ""))
    console.print(table)
    env_path = stack.data_dir / STACK_ENV_FILE
    for name, url in stack.urls.items():
        console.print(f"API docs:   {url}/docs  ({name})")
    console.print(f"logs:       {stack.log_dir}/<service>.log")
    console.print(f"env:        {env_path}  (source it: `set -a; . {env_path}; set +a`)")
    console.print(f"admin:      Authorization: Bearer $PAPERTRADE_ADMIN_TOKEN (in {env_path})")
    if stack.demo_result is not None:
        for key, value in stack.demo_result.env.items():
            secret = any(word in key for word in ("SECRET", "TOKEN", "PASSWORD"))
            console.print(f"demo:       {key}={'*** (in stack.env)' if secret else value}")
    console.print(
        f"[bold green]papertrade is up[/bold green]: {len(stack.plans)} services ready in "
        f"{stack.startup_seconds or 0:.1f}s. Ctrl-C stops it. Warnings and errors follow."
    )


class _EventPrinter:
    """Prints stack events, one line each: time, source, message."""

    _STYLE = {"info": "", "warning": "yellow", "error": "bold red"}

    def __init__(self, console: Any) -> None:
        self.console = console
        self._lock = threading.RLock()  # re-entrant: the signal handler prints on the main thread

    def __call__(self, event: StackEvent) -> None:
        style = self._STYLE.get(event.level, "")
        stamp = event.at.astimezone().strftime("%H:%M:%S")
        text = f"{stamp} {event.source:<16} {event.message}"
        with self._lock:
            self.console.print(text, style=style or None, markup=False, soft_wrap=True)


class _LogFeed:
    """Tails `<log_dir>/*.log` and reports WARNING+ lines as events (JSON lines or plain text)."""

    #: per source, at most this many lines per window, then one "N more" line
    BURST = 20
    WINDOW = 10.0
    _PLAIN = re.compile(
        r"\b(ERROR|FATAL|PANIC|CRITICAL|Traceback)\b|\[(ERR|WRN|FTL)\]|\b\w+(Error|Exception):|# WARNING"
    )

    def __init__(self, log_dir: Path, emit: Callable[[str, str, str], None]) -> None:
        self.log_dir = log_dir
        self.emit = emit
        #: only errors (set while the stack stops: disconnect warnings are expected then)
        self.quiet = False
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self._counts: dict[str, tuple[float, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-log-feed", daemon=True)
        # lines written before this run are history, not news
        for path in self._files():
            self._offsets[path] = path.stat().st_size

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _files(self) -> Iterator[Path]:
        if self.log_dir.is_dir():
            yield from sorted(self.log_dir.glob("*.log"))

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            for path in self._files():
                with contextlib.suppress(OSError):
                    self._read(path)

    def _read(self, path: Path) -> None:
        offset = self._offsets.get(path, 0)
        size = path.stat().st_size
        if size < offset:  # truncated or replaced
            offset = 0
        if size == offset:
            return
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read(min(size - offset, 1 << 20))
        self._offsets[path] = offset + len(chunk)
        data = self._partial.pop(path, b"") + chunk
        lines = data.split(b"\n")
        if lines[-1]:
            self._partial[path] = lines[-1]
        for raw in lines[:-1]:
            self._line(path.stem, raw.decode("utf-8", errors="replace").rstrip())

    def _line(self, source: str, line: str) -> None:
        if not line or any(b in line for b in _BENIGN):
            return
        level, message = _classify(line, self._PLAIN)
        if level is None or (self.quiet and level != "error"):
            return
        now = time.monotonic()
        since, count = self._counts.get(source, (now, 0))
        if now - since > self.WINDOW:
            if count > self.BURST:
                self.emit(source, "warning", f"... {count - self.BURST} more lines, see {source}.log")
            since, count = now, 0
        count += 1
        self._counts[source] = (since, count)
        if count <= self.BURST:
            self.emit(source, level, " | ".join(message.splitlines())[:300])


#: known harmless WARNING lines of the embedded servers
_BENIGN = (
    "Memory overcommit must be enabled",  # redis, on hosts without vm.overcommit_memory=1
    "the database system is starting up",  # postgres, answering the readiness probe
)


def _classify(line: str, plain: re.Pattern[str]) -> tuple[str | None, str]:
    """(level, concise message) of a log line, level None for lines below WARNING."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            level = str(record.get("level", "info")).lower()
            if level not in ("warning", "warn", "error", "critical", "exception", "fatal"):
                return None, ""
            skip = {"level", "event", "timestamp", "service", "logger", "exception"}
            extras = " ".join(f"{k}={v}" for k, v in record.items() if k not in skip)
            message = f"{record.get('event', '')} {extras}".strip()
            exc = record.get("exception")
            if isinstance(exc, str) and exc.strip():
                message += f" | {exc.strip().splitlines()[-1]}"
            return ("warning" if level in ("warning", "warn") else "error"), message
    if plain.search(line):
        return "error" if re.search(r"ERROR|FATAL|PANIC|CRITICAL|ERR\]|FTL\]|Error|Exception", line) else (
            "warning"
        ), line.strip()
    return None, ""


def _hide_password(url: str) -> str:
    return re.sub(r"(//[^:/@]+):[^@/]+@", r"\1:***@", url)
