"""The optional compiled engine: `engine.py` compiled with mypyc, used when present and current.

    python -m papertrade.book.build            # compile (needs a C compiler; `make install` runs it)
    python -m papertrade.book.build --status   # which engine `OrderBook` uses, and why

The compiled module is the same source as `papertrade.book.engine` (copied verbatim as
`papertrade.book._engine_native` plus its source hash), so both paths behave identically; the tests
run against both. It is only used when its hash matches the current `engine.py` (a stale build is
ignored) and `PAPERTRADE_BOOK_ENGINE` is not `pure`. Without a compiler everything works on the
pure-Python engine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "engine.py"
MODULE = "_engine_native"


def source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


@cache
def native_book() -> type[Any] | None:
    """The compiled `Book` class if it is built, current and allowed; else None."""
    return _load()[0]


def status() -> str:
    cls, why = _load()
    return f"compiled engine ({why})" if cls is not None else f"pure-Python engine ({why})"


def build(quiet: bool = False) -> bool:
    """Compile engine.py with mypyc into this package; False (and a message) if it cannot."""
    if _load(check_env=False)[0] is not None:
        if not quiet:
            print("papertrade.book: the compiled engine is up to date")
        return True
    digest = source_hash()
    with tempfile.TemporaryDirectory(prefix="pt-book-") as tmp:
        pkg = Path(tmp) / "papertrade" / "book"
        pkg.mkdir(parents=True)
        (pkg.parent / "__init__.py").write_text("")
        (pkg / "__init__.py").write_text("")
        text = SOURCE.read_text() + f'\n\nSOURCE_HASH = "{digest}"\n'
        (pkg / f"{MODULE}.py").write_text(text)
        cmd = [sys.executable, "-m", "mypyc", f"papertrade/book/{MODULE}.py"]
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        built = sorted(pkg.glob("*.so")) + sorted(Path(tmp).glob("*__mypyc*.so"))
        if done.returncode != 0 or not built:
            print(f"papertrade.book: mypyc build failed; using the pure-Python engine\n{done.stderr[-2000:]}")
            return False
        for old in HERE.glob(f"{MODULE}*.so"):
            old.unlink()
        for lib in built:
            shutil.copy2(lib, HERE / lib.name)
    _load.cache_clear()
    native_book.cache_clear()
    # a stale build imported by this process stays loaded in it: check the new one in a fresh one
    ok = _loads_fresh()
    if not quiet:
        print("papertrade.book: compiled engine built" if ok else "papertrade.book: build did not load")
    return ok


def _loads_fresh() -> bool:
    """Whether a new interpreter loads the compiled engine as current."""
    code = "import sys; from papertrade.book.native import _load; sys.exit(_load(check_env=False)[0] is None)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@cache
def _load(check_env: bool = True) -> tuple[type[Any] | None, str]:
    if check_env and os.environ.get("PAPERTRADE_BOOK_ENGINE", "auto").lower() == "pure":
        return None, "PAPERTRADE_BOOK_ENGINE=pure"
    try:
        import importlib

        mod = importlib.import_module(f"papertrade.book.{MODULE}")
    except ImportError:
        return None, "not built: python -m papertrade.book.build"
    if getattr(mod, "SOURCE_HASH", None) != source_hash():
        return None, "the compiled build is stale (engine.py changed): rebuild it"
    book: type[Any] = mod.Book
    return book, f"mypyc, source {source_hash()}"
