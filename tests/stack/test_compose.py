"""docker-compose.yml, the Dockerfiles and .env.example agree with papertrade.stack.services and with
what the local runner (`make up`) starts. No Docker engine is needed: the files are read and checked.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from papertrade.stack.runner import plan_services
from papertrade.stack.services import COMMON_ENV, DEPENDS_ON, SERVICES, START_ORDER, ServiceSpec

REPO = Path(__file__).resolve().parents[2]
INFRA = ("nats", "postgres", "redis")
_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?+][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose["services"]
    assert isinstance(svcs, dict)
    return svcs


def test_every_service_and_only_those_plus_infra_and_strategies(services: dict[str, dict[str, Any]]) -> None:
    default = {n for n, s in services.items() if not s.get("profiles")}
    assert default == {s.name for s in SERVICES} | set(INFRA)
    profiled = {n for n, s in services.items() if s.get("profiles")}
    assert profiled, "a strategies profile with strategy containers"
    for name in profiled:
        assert services[name]["profiles"] == ["strategies"], name


@pytest.mark.parametrize("s", SERVICES, ids=lambda s: s.name)
def test_build_context_and_dockerfile_exist(services: dict[str, dict[str, Any]], s: ServiceSpec) -> None:
    build = services[s.name]["build"]
    context = REPO / build["context"]
    assert context.is_dir()
    dockerfile = context / build["dockerfile"]
    assert dockerfile.is_file(), dockerfile
    assert dockerfile == REPO / s.directory / "Dockerfile"


@pytest.mark.parametrize("s", SERVICES, ids=lambda s: s.name)
def test_ports_match_the_services_table(services: dict[str, dict[str, Any]], s: ServiceSpec) -> None:
    svc = services[s.name]
    assert svc["ports"] == [f"${{{s.port_env}:-{s.port}}}:{s.port}"]
    env = svc["environment"]
    assert env[s.port_env] == str(s.port)
    assert env[f"{s.env_prefix}_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("s", SERVICES, ids=lambda s: s.name)
def test_common_env_and_service_urls_are_passed(services: dict[str, dict[str, Any]], s: ServiceSpec) -> None:
    env = services[s.name]["environment"]
    for key in COMMON_ENV:
        assert key in env, f"{s.name} lacks {key}"
    for other in SERVICES:
        assert env[other.url_env] == f"http://{other.name}:{other.port}"
    assert env["NATS_URL"] == "nats://nats:4222"
    assert env["REDIS_URL"].startswith("redis://redis:6379")
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert {"path": ".env", "required": False} in services[s.name]["env_file"]


@pytest.mark.parametrize("s", SERVICES, ids=lambda s: s.name)
def test_healthcheck_and_depends_on_healthy(services: dict[str, dict[str, Any]], s: ServiceSpec) -> None:
    svc = services[s.name]
    test = " ".join(svc["healthcheck"]["test"])
    assert f"http://127.0.0.1:{s.port}/readyz" in test
    depends = svc["depends_on"]
    assert set(INFRA) <= set(depends)
    for name, cond in depends.items():
        assert cond == {"condition": "service_healthy"}, (s.name, name)


def test_compose_depends_on_matches_the_runners_dependencies(services: dict[str, dict[str, Any]]) -> None:
    """Besides the infrastructure, a service waits for exactly the services DEPENDS_ON names: the
    table `make up` follows too."""
    for s in SERVICES:
        waits_for = set(services[s.name]["depends_on"]) - set(INFRA)
        assert waits_for == set(DEPENDS_ON.get(s.name, ())), s.name
    for name, deps in DEPENDS_ON.items():
        for dep in deps:
            assert START_ORDER.index(dep) < START_ORDER.index(name), "START_ORDER puts dependencies first"


def test_infra_has_volumes_and_healthchecks(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    nats = services["nats"]
    assert "--jetstream" in nats["command"] or "-js" in nats["command"]
    assert any(v.endswith(":/data") for v in nats["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for name in INFRA:
        assert services[name]["healthcheck"]["test"], name
        for volume in services[name]["volumes"]:
            assert volume.split(":")[0] in compose["volumes"]


def test_local_runner_plan_matches_compose(services: dict[str, dict[str, Any]]) -> None:
    """The runner starts exactly these services, same modules, ports and env var names."""
    base = {k: f"<{k}>" for k in COMMON_ENV}
    plans = plan_services(base)
    assert [p.name for p in plans] == list(START_ORDER)
    assert {p.name for p in plans} == {s.name for s in SERVICES}
    for plan in plans:
        svc = services[plan.name]
        assert set(plan.env) == set(svc["environment"]), plan.name
        assert plan.port == int(svc["environment"][plan.spec.port_env])
        assert svc["command"] == ["python", "-m", plan.module]
        assert _dockerfile_cmd(REPO / plan.spec.directory / "Dockerfile") == ["python", "-m", plan.module]
        for key in COMMON_ENV:
            assert plan.env[key] == base[key]
        assert plan.env[f"{plan.spec.env_prefix}_HOST"] == "127.0.0.1"


@pytest.mark.parametrize("s", SERVICES, ids=lambda s: s.name)
def test_dockerfile(s: ServiceSpec) -> None:
    path = REPO / s.directory / "Dockerfile"
    lines = _instructions(path)
    assert lines[0] == "FROM python:3.11-slim"
    users = [arg for cmd, arg in _split(lines) if cmd == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    # the dependency layer comes before the sources, so source edits keep it cached
    text = "\n".join(lines)
    deps = text.index("COPY pyproject.toml uv.lock")
    sync_deps = text.index("--no-install-project")
    sources = text.index("COPY shared/")
    assert deps < sync_deps < sources
    assert "uv sync --frozen" in text
    # bytecode for the dependencies and the sources: PYTHONDONTWRITEBYTECODE would make every start
    # compile them (about 2 s per service process on this project's machines)
    assert "UV_COMPILE_BYTECODE=1" in text
    assert text.index("RUN python -m compileall -q shared services") > text.rindex("uv sync --frozen")
    assert f"EXPOSE {s.port}" in lines
    assert f"{s.env_prefix}_HOST=0.0.0.0" in text
    cmd = _dockerfile_cmd(path)
    assert cmd[:2] == ["python", "-m"]
    module = importlib.import_module(cmd[2])
    assert module.__name__ == s.module
    assert importlib.util.find_spec(f"{s.module}.__main__") is not None


def test_env_example_documents_every_variable(compose: dict[str, Any]) -> None:
    text = (REPO / "docker-compose.yml").read_text()
    referenced = set(_VAR.findall(text))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (REPO / ".env.example").read_text(), re.M))
    missing = (referenced | set(COMMON_ENV) | {s.port_env for s in SERVICES}) - documented
    assert not missing, f".env.example does not document {sorted(missing)}"
    assert "PAPERTRADE_ADMIN_TOKEN" in referenced


def test_strategy_containers(services: dict[str, dict[str, Any]]) -> None:
    from papertrade.strategy.loader import load_strategy_class

    strategies = {n: s for n, s in services.items() if s.get("profiles") == ["strategies"]}
    entrypoints = set()
    for name, svc in strategies.items():
        env = svc["environment"]
        for key in ("STRATEGY_ENTRYPOINT", "STRATEGY_PARAMS", "STRATEGY_SYMBOLS", "STRATEGY_INTERVAL"):
            assert key in env, (name, key)
        for key in ("APCA_API_KEY_ID", "APCA_API_SECRET_KEY", "BROKER_URL", "NATS_URL"):
            assert key in env, (name, key)
        assert "PAPERTRADE_ADMIN_TOKEN" not in env and "env_file" not in svc, "no admin token in strategies"
        assert env["BROKER_URL"] == "http://broker:8000"
        assert isinstance(json.loads(env["STRATEGY_PARAMS"]), dict)
        cls = load_strategy_class(env["STRATEGY_ENTRYPOINT"])
        assert cls.__name__ == env["STRATEGY_ENTRYPOINT"].rsplit(":", 1)[1]
        entrypoints.add(env["STRATEGY_ENTRYPOINT"])
        assert svc["build"]["dockerfile"] == "services/strategy-runner/Dockerfile"
        for cond in svc["depends_on"].values():
            assert cond == {"condition": "service_healthy"}
    assert entrypoints >= {
        "papertrade.samples.sma_cross:SmaCross",
        "papertrade.samples.buy_and_hold:BuyAndHold",
    }


def test_strategy_container_command_reads_the_compose_env(services: dict[str, dict[str, Any]]) -> None:
    """The command imports, and its own config reader accepts each container's env (compose defaults
    filled in, a dummy key pair) and builds the strategy with those params."""
    from papertrade.strategy.loader import build_strategy

    strategies = {n: s for n, s in services.items() if s.get("profiles") == ["strategies"]}
    commands = {tuple(s["command"]) for s in strategies.values()}
    assert len(commands) == 1
    (command,) = commands
    assert command[:2] == ("python", "-m")
    container = importlib.import_module(command[2])
    for name, svc in strategies.items():
        env = {k: _compose_default(str(v)) for k, v in svc["environment"].items()}
        env.update(APCA_API_KEY_ID="PKTEST", APCA_API_SECRET_KEY="secret")
        config = container.ContainerConfig.from_env(env)
        assert config.broker_url == "http://broker:8000" and config.nats_url == "nats://nats:4222", name
        assert config.symbols, name
        build_strategy(config.entrypoint, config.params)


def test_dockerignore_keeps_what_images_need() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".papertrade", ".git"} <= ignored
    for needed in ("shared", "services", "pyproject.toml", "uv.lock", "README.md"):
        assert needed not in ignored


def _compose_default(value: str) -> str:
    """`value` as compose would interpolate it with nothing set: `${VAR:-default}` -> default."""
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*:?-([^}]*)\}", r"\1", value)


def _instructions(path: Path) -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    out: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        out.append(current + line)
        current = ""
    return out


def _split(lines: list[str]) -> list[tuple[str, str]]:
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _dockerfile_cmd(path: Path) -> list[str]:
    cmds = [arg for cmd, arg in _split(_instructions(path)) if cmd == "CMD"]
    assert cmds, f"{path} has no CMD"
    value = json.loads(cmds[-1])
    assert isinstance(value, list)
    return [str(v) for v in value]
