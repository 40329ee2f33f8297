"""The images' Python environment, built without Docker: the `uv sync` commands of a Dockerfile, run
the way its layers run them (dependencies first from pyproject.toml + uv.lock alone, then the
sources), must give an environment (runtime dependencies only: no dev or bench groups, no embedded
servers) in which every service's CMD module and the strategy container's module import."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from papertrade.stack.services import SERVICES

REPO = Path(__file__).resolve().parents[2]


def test_dockerfile_uv_layers_give_a_runtime_env_where_every_service_imports(tmp_path: Path) -> None:
    uv = shutil.which("uv") or str(REPO / ".uv" / "bin" / "uv")
    if not Path(uv).exists():
        pytest.skip("uv is not installed here (make install puts one in .uv/)")
    dockerfile = REPO / "services" / "broker" / "Dockerfile"
    syncs = _uv_commands(dockerfile)
    assert len(syncs) == 2 and "--no-install-project" in syncs[0]
    app = tmp_path / "app"
    app.mkdir()
    env = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(tmp_path / "venv"),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_PYTHON": sys._base_executable,  # type: ignore[attr-defined]  # the interpreter, not our venv
        "UV_LINK_MODE": "copy",
        "VIRTUAL_ENV": "",
    }
    # layer 1: only what the Dockerfile copies before the first sync
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(REPO / name, app / name)
    _run([uv, *syncs[0][1:]], app, env)
    python = tmp_path / "venv" / "bin" / "python"
    dev_only = subprocess.run([python, "-c", "import pytest"], capture_output=True)
    assert dev_only.returncode != 0, "dev dependencies leaked into the image"
    # layer 2: the sources, then the project
    shutil.copy(REPO / "README.md", app / "README.md")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "shared", app / "shared", ignore=ignore)
    shutil.copytree(REPO / "services", app / "services", ignore=ignore)
    _run([uv, *syncs[1][1:]], app, env)
    modules = [f"{s.module}.__main__" for s in SERVICES] + ["papertrade_strategy_runner.container"]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    _run([str(python), "-c", code, *modules], tmp_path, {**env, "PYTHONDONTWRITEBYTECODE": "1"})


def _uv_commands(dockerfile: Path) -> list[list[str]]:
    """The `uv sync ...` commands of the Dockerfile's RUN lines, build-only options dropped."""
    text = dockerfile.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line.strip())
        if words[:1] == ["RUN"] and "uv" in words and "sync" in words:
            argv = [w for w in words[1:] if not w.startswith("--mount=")]
            out.append(argv)
    return out


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"
