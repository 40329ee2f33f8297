"""Start one service as a process (`python -m <module>`) and wait until it is ready.

The one way services are launched outside containers: by `make up` and by tests that need a real
service process.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from papertrade.stack.procs import ManagedProcess, free_port
from papertrade.stack.services import ServiceSpec, spec


def service_env(
    spec: ServiceSpec, base: Mapping[str, str], ports: Mapping[str, int] | None = None
) -> dict[str, str]:
    """The env of one service process: `base` plus its port and every service's URL."""
    from papertrade.stack.services import SERVICES

    env = dict(base)
    ports = dict(ports or {})
    for s in SERVICES:
        port = ports.get(s.name, s.port)
        env.setdefault(s.url_env, f"http://127.0.0.1:{port}")
        if s.name == spec.name:
            env[s.port_env] = str(port)
    return env


def start_service(spec: ServiceSpec, env: Mapping[str, str], log_dir: Path) -> ManagedProcess:
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    return ManagedProcess(
        spec.name, [sys.executable, "-m", spec.module], log_path=log_dir / f"{spec.name}.log", env=full_env
    ).start()


def service_url(spec: ServiceSpec, env: Mapping[str, str]) -> str:
    return f"http://127.0.0.1:{env.get(spec.port_env, spec.port)}"


def wait_ready(proc: ManagedProcess, url: str, timeout: float = 60.0) -> float:
    """Poll `<url>/readyz` until 200; returns the seconds it took. Raises with the log tail if it dies."""
    start = time.monotonic()
    last = "no answer"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() - start < timeout:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.returncode()}:\n{proc.tail(40)}")
            try:
                r = client.get(f"{url}/readyz")
                if r.status_code == 200:
                    return time.monotonic() - start
                last = r.text
            except httpx.HTTPError as exc:
                last = str(exc) or type(exc).__name__
            time.sleep(0.1)
    raise TimeoutError(f"{proc.name} not ready after {timeout:g}s: {last}\n{proc.tail(40)}")


def launch(
    name: str, env: Mapping[str, str], log_dir: Path, *, port: int | None = None, timeout: float = 60.0
) -> tuple[ManagedProcess, str]:
    """Start service `name` on `port` (a free one by default) with `env`, and wait until it is ready.

    Returns (process, base URL); a service that never gets ready is stopped before the error is raised.
    """
    s = spec(name)
    full = service_env(s, env, {name: port if port is not None else free_port()})
    proc = start_service(s, full, log_dir)
    url = service_url(s, full)
    try:
        wait_ready(proc, url, timeout)
    except BaseException:
        proc.stop()
        raise
    return proc, url
