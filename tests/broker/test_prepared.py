"""The hot paths' prepared statements (`papertrade_broker.prepared`): planned once per connection, on
tables that may still be empty and never analyzed, their generic plans must find rows by index, or
the cost per order grows with the tables (the ledger once read every order on every batch)."""

from __future__ import annotations

import uuid

import psycopg

from papertrade.db import migrate
from papertrade_broker import consumer, hotpath, prepared
from papertrade_broker.app import MIGRATIONS, VERSION_TABLE

#: a sample literal per parameter type
_SAMPLES = {
    "uuid[]": f"'{{{uuid.uuid4()}}}'",
    "text[]": "'{AAPL}'",
    "int[]": "'{1}'",
    "json": "'[]'",
    "timestamptz": "now()",
    "int": "0",
}


def test_no_statement_scans_a_whole_table(fresh_database_url: str) -> None:
    migrate(fresh_database_url, MIGRATIONS, VERSION_TABLE)
    statements = [*hotpath.STATEMENTS, *consumer.STATEMENTS]
    with psycopg.connect(hotpath.libpq_url(fresh_database_url), **prepared.CONNECTION) as conn:
        for st in statements:
            conn.execute(st.prepare.encode())
        scans = {}
        for st in statements:
            call = st(*(_SAMPLES[t].encode() for t in st.types))
            plan = [row[0] for row in conn.execute(b"EXPLAIN " + call)]
            scans[st.name] = [line.strip() for line in plan if "Seq Scan" in line]
    assert scans == {st.name: [] for st in statements}
