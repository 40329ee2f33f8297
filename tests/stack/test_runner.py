"""`make up` (python -m papertrade.stack up) and the in-process `Stack`: start, ready, crash restart,
SIGINT, clean exit, no orphans; plus the runner's small parts."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from papertrade.stack.demo import DemoContext, DemoResult
from papertrade.stack.infra import Endpoints
from papertrade.stack.runner import (
    READY,
    STACK_ENV_FILE,
    Stack,
    StackError,
    _classify,
    _LogFeed,
    admin_token,
    plan_services,
    resolve_ports,
    restart_delay,
)
from papertrade.stack.services import COMMON_ENV, SERVICES, START_ORDER
from tests.conftest import ADMIN_TOKEN

REPO = Path(__file__).resolve().parents[2]
URL_KEYS = ("BROKER_URL", "STREAMER_URL", "ORDERBOOK_URL", "RISK_URL", "STRATEGY_RUNNER_URL")
LINK_KEYS = ("NATS_URL", "DATABASE_URL", "REDIS_URL")


def test_make_up_runs_the_stack_and_sigint_stops_it_without_orphans(tmp_path: Path) -> None:
    """The real command against embedded infra: ready, a crashed service comes back, Ctrl-C is clean."""
    data = tmp_path / "pt"
    env = {k: v for k, v in os.environ.items() if k not in (*LINK_KEYS, "PAPERTRADE_ADMIN_TOKEN")}
    env["PYTHONUNBUFFERED"] = "1"
    out = tmp_path / "up.out"
    with open(out, "wb") as sink:
        runner = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "papertrade.stack",
                "up",
                "--no-demo",
                "--free-ports",
                "--data-dir",
                str(data),
            ],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        stack_env = _wait_for_stack_env(data / STACK_ENV_FILE, runner, out)
        assert set(URL_KEYS) | set(LINK_KEYS) | {"PAPERTRADE_ADMIN_TOKEN"} <= set(stack_env)
        assert "APCA_API_KEY_ID" not in stack_env  # --no-demo
        for key in URL_KEYS:
            r = httpx.get(f"{stack_env[key]}/readyz", timeout=5)
            assert r.status_code == 200, (key, r.text)
        # the admin token: generated once, kept private, handed to the services
        token_file = data / "admin_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token_file.read_text().strip() == stack_env["PAPERTRADE_ADMIN_TOKEN"]
        assert stat.S_IMODE((data / STACK_ENV_FILE).stat().st_mode) == 0o600
        for spec in SERVICES:
            assert (data / "logs" / f"{spec.name}.log").exists()
        text = out.read_text()
        assert "papertrade is up" in text
        # the strategy-runner (DEPENDS_ON) starts only once the broker is ready
        assert text.index("broker           ready at") < text.index("strategy-runner  started")
        for spec in SERVICES:
            assert spec.name in text and stack_env[spec.url_env] in text  # the status table

        # a crashed service is restarted
        parent = psutil.Process(runner.pid)
        broker = _child_running(parent, "papertrade_broker")
        broker.kill()
        _wait(lambda: _restarted(parent, "papertrade_broker", broker.pid, stack_env["BROKER_URL"]), 120, out)
        _wait(lambda: "restarted" in out.read_text(), 30, out)

        children = parent.children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children if _alive(c))
        for needle in ("nats-server", "redis-server", "postgres", *(s.module for s in SERVICES)):
            assert needle in names
        runner.send_signal(signal.SIGINT)
        assert runner.wait(60) == 0, out.read_text()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    alive = [c for c in children if _alive(c)]
    assert not alive, f"orphans: {[(c.pid, c.cmdline()) for c in alive]}"
    text = out.read_text()
    assert "papertrade stopped" in text
    # services were stopped in reverse start order, before the infra
    order = [text.index(f"{name:<16} stopping") for name in reversed(START_ORDER)]
    assert order == sorted(order)
    assert order[-1] < text.index("stopping infra")
    assert not (data / STACK_ENV_FILE).exists()
    for spec in SERVICES:
        assert "service stopped" in (data / "logs" / f"{spec.name}.log").read_text()


def test_sigterm_while_starting_stops_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "pt"
    env = {k: v for k, v in os.environ.items() if k not in LINK_KEYS}
    out = tmp_path / "up.out"
    with open(out, "wb") as sink:
        runner = subprocess.Popen(
            [sys.executable, "-m", "papertrade.stack", "up", "--free-ports", "--data-dir", str(data)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait(lambda: (data / "logs" / "streamer.log").exists() or runner.poll() is not None, 180, out)
        assert runner.poll() is None, out.read_text()
        children = psutil.Process(runner.pid).children(recursive=True)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(60) == 0, out.read_text()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    alive = [c for c in children if _alive(c)]
    assert not alive, f"orphans: {[(c.pid, c.cmdline()) for c in alive]}"
    text = out.read_text()
    assert "stopped before the stack was ready" in text and "papertrade stopped" in text
    assert not (data / STACK_ENV_FILE).exists()


def test_stack_in_process_with_external_infra_and_a_demo_hook(infra: Endpoints, tmp_path: Path) -> None:
    """`Stack` as end-to-end tests use it: external infra (the session's), free ports, a demo hook."""
    seen: list[DemoContext] = []

    def demo(ctx: DemoContext) -> DemoResult:
        seen.append(ctx)
        return DemoResult(env={"APCA_API_KEY_ID": "demo-key"}, notes=["demo ran"])

    env = {**infra.env(), "PAPERTRADE_ADMIN_TOKEN": ADMIN_TOKEN, "LOG_LEVEL": "INFO", "PT_STACK_MARK": "m1"}
    # a subset keeps this test short: the full five are the subprocess test's job
    wanted = ("broker", "streamer")
    stack = Stack(tmp_path / "pt", env=env, free_ports=True, persist=False, demo=demo, services=wanted)
    with stack:
        assert set(stack.states.values()) == {READY}
        assert list(stack.urls) == ["streamer", "broker"]  # START_ORDER, whatever the order asked
        for url in stack.urls.values():
            assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        assert seen and seen[0].admin_token == ADMIN_TOKEN and seen[0].urls == stack.urls
        lines = _read_env(stack.data_dir / STACK_ENV_FILE)
        assert lines["APCA_API_KEY_ID"] == "demo-key"
        assert lines["NATS_URL"] == infra.nats_url and lines["DATABASE_URL"] == infra.database_url
        assert lines["PAPERTRADE_ADMIN_TOKEN"] == ADMIN_TOKEN
        assert stack.endpoints is not None and stack.endpoints.embedded == set()
        rows = {r.name: r for r in stack.status()}
        assert rows["nats"].state == "external" and rows["broker"].state == READY
        # admin routes take the stack's token
        r = httpx.get(f"{stack.urls['broker']}/healthz", timeout=5)
        assert r.status_code == 200
        pids = stack.pids()
        assert set(pids) == set(wanted)  # external infra: no infra process of ours
        environ = Path(f"/proc/{pids['streamer']}/environ").read_bytes().split(b"\0")
        assert b"PT_STACK_MARK=m1" in environ  # the stack's env reaches the services
        assert f"STREAMER_PORT={stack.plans[0].port}".encode() in environ
        # a second stack on the same data dir is refused while this one runs
        with pytest.raises(StackError, match="another stack runs"):
            Stack(tmp_path / "pt", env=env, free_ports=True, persist=False, demo=None).start()
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert any(e.message == "demo ran" for e in stack.events)


def test_a_service_that_cannot_start_is_a_clear_error(infra: Endpoints, tmp_path: Path) -> None:
    env = {**infra.env(), "PAPERTRADE_ADMIN_TOKEN": "x", "STREAMER_FEED": "no-such-feed"}
    stack = Stack(tmp_path, env=env, free_ports=True, persist=False, demo=None, services=["streamer"])
    with pytest.raises(
        StackError, match=r"(?s)streamer exited with code \d+ \(log: .*streamer.log\).*STREAMER_FEED"
    ):
        stack.start()
    assert stack.pids() == {}


def test_unreachable_infra_is_a_clear_error(tmp_path: Path) -> None:
    env = {"NATS_URL": "nats://127.0.0.1:9", "REDIS_URL": "redis://127.0.0.1:9/0"}
    env["DATABASE_URL"] = "postgresql+psycopg://postgres@127.0.0.1:9/papertrade"
    with pytest.raises(StackError, match="NATS/Postgres/Redis did not start: OperationalError"):
        Stack(tmp_path, env=env, free_ports=True, persist=False, demo=None).start()


def test_busy_port_is_a_clear_error(infra: Endpoints, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {**infra.env(), "BROKER_PORT": str(port), "PAPERTRADE_ADMIN_TOKEN": "x"}
        with pytest.raises(StackError, match=f"broker {port}.*BROKER_PORT"):
            Stack(tmp_path, env=env, persist=False, demo=None).start()


def test_admin_token_from_env_else_generated_once(tmp_path: Path) -> None:
    assert admin_token(tmp_path, {"PAPERTRADE_ADMIN_TOKEN": " given "}) == "given"
    assert not (tmp_path / "admin_token").exists()
    first = admin_token(tmp_path, {})
    assert len(first) >= 32
    assert stat.S_IMODE((tmp_path / "admin_token").stat().st_mode) == 0o600
    assert admin_token(tmp_path, {}) == first
    (tmp_path / "given").write_text("from-file\n")
    assert admin_token(tmp_path, {"PAPERTRADE_ADMIN_TOKEN_FILE": str(tmp_path / "given")}) == "from-file"
    with pytest.raises(StackError, match="PAPERTRADE_ADMIN_TOKEN_FILE"):
        admin_token(tmp_path, {"PAPERTRADE_ADMIN_TOKEN_FILE": str(tmp_path / "missing")})


def test_restart_backoff_grows_and_caps() -> None:
    delays = [restart_delay(n) for n in range(10)]
    assert delays[:3] == [1.0, 2.0, 4.0]
    assert delays == sorted(delays)
    assert delays[-1] == 30.0


def test_ports_from_env_defaults_or_free() -> None:
    assert resolve_ports({}) == {s.name: s.port for s in SERVICES}
    assert resolve_ports({"RISK_PORT": "9103"})["risk"] == 9103
    free = resolve_ports({}, free=True)
    assert len(set(free.values())) == len(SERVICES)
    with pytest.raises(StackError, match="BROKER_PORT"):
        resolve_ports({"BROKER_PORT": "x"})


def test_plan_gives_each_service_every_url_and_its_port() -> None:
    base = {k: k.lower() for k in COMMON_ENV}
    ports = {s.name: 9000 + i for i, s in enumerate(SERVICES)}
    for plan in plan_services(base, ports):
        assert plan.port == ports[plan.name]
        assert plan.env[plan.spec.port_env] == str(plan.port)
        assert plan.url == f"http://127.0.0.1:{plan.port}"
        for s in SERVICES:
            assert plan.env[s.url_env] == f"http://127.0.0.1:{ports[s.name]}"
    with pytest.raises(StackError, match="DATABASE_URL"):
        plan_services({"NATS_URL": "x"})


def test_log_lines_are_classified() -> None:
    plain = _LogFeed._PLAIN
    assert _classify('{"event": "hello", "level": "info"}', plain) == (None, "")
    level, message = _classify('{"event": "nats disconnected", "level": "warning", "client": "risk"}', plain)
    assert level == "warning" and message == "nats disconnected client=risk"
    level, message = _classify(
        '{"event": "boom", "level": "error", "exception": "Traceback...\\nValueError: bad"}', plain
    )
    assert level == "error" and message.endswith("| ValueError: bad")
    assert _classify("ValueError: bad", plain)[0] == "error"
    assert (
        _classify("2026-11-22 05:00:00 UTC [1] FATAL:  the database system is starting up", plain)[0]
        == "error"
    )
    assert _classify("[1] 2026/11/22 05:00:00.000000 [WRN] slow consumer", plain)[0] == "warning"
    assert _classify("[1] 2026/11/22 05:00:00.000000 [INF] Server is ready", plain)[0] is None


def test_log_feed_reports_new_warnings_only(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "risk.log").write_text('{"event": "old", "level": "error"}\n')
    got: list[tuple[str, str, str]] = []
    feed = _LogFeed(logs, lambda *e: got.append(e))
    feed.start()
    try:
        with open(logs / "risk.log", "a") as f:
            f.write('{"event": "fine", "level": "info"}\n{"event": "new", "level": "error"}\n')
        (logs / "broker.log").write_text('{"event": "careful", "level": "warning"}\n{"event": "partial"')
        _wait(lambda: len(got) >= 2, 5)
    finally:
        feed.stop()
    assert sorted(got) == [("broker", "warning", "careful"), ("risk", "error", "new")]


# --- helpers -------------------------------------------------------------------------------------


def _wait_for_stack_env(path: Path, runner: subprocess.Popen[bytes], out: Path) -> dict[str, str]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if runner.poll() is not None:
            pytest.fail(f"the runner exited with {runner.returncode}:\n{out.read_text()}")
        if path.exists():
            return _read_env(path)
        time.sleep(0.2)
    pytest.fail(f"no {path} after 180s:\n{out.read_text()}")


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def _child_running(parent: psutil.Process, module: str) -> psutil.Process:
    for child in parent.children():
        try:
            if module in child.cmdline() and _alive(child):
                return child
        except psutil.Error:  # a zombie not reaped yet, or gone
            continue
    raise AssertionError(f"no child runs {module}")


def _restarted(parent: psutil.Process, module: str, old_pid: int, url: str) -> bool:
    try:
        child = _child_running(parent, module)
    except AssertionError:
        return False
    if child.pid == old_pid:
        return False
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait(check: object, timeout: float, output: Path | None = None) -> None:
    """Poll `check` (a liveness bound for a loaded CI machine, not a speed assertion)."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s\n{output.read_text() if output else ''}")
        time.sleep(0.2)
