"""Statements prepared once per connection and run several to a round trip.

The hot paths (the group commit, the ledger) send a transaction's statements in as few round trips as
they can. psycopg's pipeline mode does that with server-side parameters, but its Python machinery
costs ~0.1 ms per statement and more to enter and leave (measured here: BEGIN + one SELECT + COMMIT
in a pipeline 0.25 ms; the same three in one simple-protocol query 0.10 ms). So each statement is
prepared at the SQL level when a connection opens (`PREPARE name(types) AS ...`, still one generic
plan with `plan_cache_mode=force_generic_plan`), and a round trip is ONE simple-protocol query
`BEGIN; EXECUTE a(...); EXECUTE b(...)` whose arguments are literals: integers and UUIDs formatted
from their types, text escaped by libpq (`PQescapeLiteral`, which knows the connection's encoding
and quoting rules). Postgres runs the statements in order and stops at the first error; the results
come back one set per statement.

The connections must not let psycopg prepare statements itself (`prepare_threshold=None`): psycopg
answers a ROLLBACK on a connection where it prepared any with `DEALLOCATE ALL`, which drops these too.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import Escaping, TransactionStatus

BEGIN = b"BEGIN"
COMMIT = b"COMMIT"
#: Session options of a connection that runs these statements (libpq `options`). Generic plans,
#: planned once per connection: with array parameters Postgres would otherwise re-plan every call.
#: No sequential scans: a statement is prepared when its tables may still be empty and never
#: analyzed, and its generic plan would scan whole tables for good (until an autoanalyze replans
#: it), so the ledger read every order on every batch and the cost per order grew with the table.
#: Every statement here finds its rows by index.
OPTIONS = "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off"
#: The connection arguments (psycopg `connect` keywords) every connection that runs these statements
#: takes: autocommit (a transaction's BEGIN and COMMIT are statements of its queries), no preparing
#: by psycopg itself (above), `OPTIONS`.
CONNECTION: dict[str, Any] = {"autocommit": True, "prepare_threshold": None, "options": OPTIONS}


@dataclass(frozen=True)
class Statement:
    """A statement prepared under `name` with parameters `$1...` of `types`."""

    name: str
    types: tuple[str, ...]
    sql: str

    @property
    def prepare(self) -> str:
        return f"PREPARE {self.name}({', '.join(self.types)}) AS {self.sql}"

    def __call__(self, *args: bytes) -> bytes:
        """`EXECUTE name(args)`: each argument a literal of this module's helpers."""
        if len(args) != len(self.types):
            raise TypeError(f"{self.name} takes {len(self.types)} arguments, got {len(args)}")
        return b"EXECUTE " + self.name.encode() + b"(" + b", ".join(args) + b")"


async def prepare(conn: AsyncConnection[Any], statements: Iterable[Statement]) -> None:
    """Prepare `statements` on `conn` (once per connection: prepared statements live as long as the
    session, whatever its transactions do)."""
    await conn.execute(";".join(s.prepare for s in statements).encode(), prepare=False)


async def run(conn: AsyncConnection[Any], *statements: bytes) -> list[list[Any]]:
    """Send `statements` as one query (one round trip); the rows of each, in order ([] for a command).
    An error in one raises here, and Postgres ran none after it."""
    cur = await conn.execute(b"; ".join(statements), prepare=False)
    out: list[list[Any]] = []
    while True:
        out.append(await cur.fetchall() if cur.description is not None else [])
        if not cur.nextset():
            return out


@contextlib.asynccontextmanager
async def transaction(conn: AsyncConnection[Any]) -> AsyncIterator[None]:
    """The block runs a transaction on an autocommit connection by `run` calls (its first sends BEGIN,
    its last COMMIT); a block that raises leaves the connection idle, the transaction rolled back."""
    try:
        yield
    except BaseException:
        await _rollback(conn)
        raise


def integer(value: int) -> bytes:
    """An integer literal."""
    return str(int(value)).encode()


def ints(values: Iterable[int]) -> bytes:
    """An integer array literal."""
    return ("'{" + ",".join(str(int(v)) for v in values) + "}'").encode()


def uuids(values: Iterable[UUID]) -> bytes:
    """A uuid array literal (hex digits only: nothing to escape)."""
    return ("'{" + ",".join(v.hex for v in values) + "}'").encode()


def text(conn: AsyncConnection[Any], value: str | bytes) -> bytes:
    """A text literal (JSON too: the statement's parameter type reads it; bytes are UTF-8 text)."""
    return Escaping(conn.pgconn).escape_literal(value.encode() if isinstance(value, str) else value)


def texts(conn: AsyncConnection[Any], values: Iterable[str]) -> bytes:
    """A text array literal: every element quoted inside the array syntax, the whole escaped by libpq."""
    elements = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return text(conn, "{" + ",".join(elements) + "}")


async def _rollback(conn: AsyncConnection[Any]) -> None:
    """End a transaction a failure left open or aborted (its locks with it), so the connection can
    be used again; a broken connection is left to its owner (the pool, the ledger) to replace."""
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with contextlib.suppress(psycopg.Error):
            await conn.execute("ROLLBACK")
