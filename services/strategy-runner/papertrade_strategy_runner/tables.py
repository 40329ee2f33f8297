"""The strategy-runner's tables: one row per deployment (what to run, whether it should run, and the
last status its process reported, so that a restarted runner resumes them and shows their counters)."""

from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, Numeric, String, Table, Text, Uuid

metadata = MetaData()

deployments = Table(
    "strategy_deployments",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("entrypoint", String(500), nullable=False),
    Column("params", JSON, nullable=False),
    Column("symbols", JSON, nullable=False),
    Column("interval", String(8), nullable=False),
    Column("account_id", Uuid, nullable=False),
    #: running | stopped: what the user asked for (a running deployment restarts with the runner)
    Column("desired", String(16), nullable=False),
    #: running | stopped | error: what the process last reported
    Column("status", String(16), nullable=False),
    Column("bars_seen", Integer, nullable=False, server_default="0"),
    Column("orders_sent", Integer, nullable=False, server_default="0"),
    Column("fills", Integer, nullable=False, server_default="0"),
    Column("pnl", Numeric(28, 10), nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
