"""Engines under test: the pure-Python `Book` and, when built, the same source compiled with mypyc."""

from __future__ import annotations

from typing import Any

import pytest

from papertrade.book import engine as E
from papertrade.book.native import native_book

ENGINES: dict[str, Any] = {"pure": E.Book}
if native_book() is not None:
    ENGINES["native"] = native_book()


def engine_class(name: str) -> Any:
    if name not in ENGINES:
        pytest.skip("the compiled engine is not built (python -m papertrade.book.build)")
    return ENGINES[name]


@pytest.fixture(params=["pure", "native"])
def engine(request: pytest.FixtureRequest) -> Any:
    return engine_class(request.param)
