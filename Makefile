# papertrade: `make up` runs the stack, `make test` runs the linters and the tests.
# Both install what they need: a private uv in .uv/ and the locked environment in .venv/.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .uv/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
# e.g. make up UP_ARGS="--no-demo --free-ports" (see python -m papertrade.stack up --help)
UP_ARGS ?=

.PHONY: up test lint typecheck pytest bench install clean book-native bytecode

install: $(VENV)/.installed book-native bytecode

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-extras --python $(PYTHON)
	@touch $@

# The matching engine compiled with mypyc (skipped when current; without a C compiler the
# pure-Python engine, which behaves identically, is used).
book-native: $(VENV)/.installed
	-@$(PY) -m papertrade.book.build --quiet

# Bytecode for the environment (once per sync) and for our sources (0.1 s when current). Where
# PYTHONDONTWRITEBYTECODE is set, as on this project's machines and in the images, every process
# would otherwise compile what it imports at start-up: about 2 s per service process here.
bytecode: $(VENV)/.bytecode
	@$(PY) -m compileall -q -j 0 shared services

$(VENV)/.bytecode: $(VENV)/.installed
	@$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
	@touch $@

.uv/bin/uv:
	$(PYTHON) -m venv .uv
	.uv/bin/python -m pip install --quiet --disable-pip-version-check "uv>=0.5"

up: install
	$(PY) -m papertrade.stack up $(UP_ARGS)

test: install lint typecheck pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .uv .pytest_cache .mypy_cache .ruff_cache
	find shared services tests bench -name __pycache__ -type d -prune -exec rm -rf {} +
