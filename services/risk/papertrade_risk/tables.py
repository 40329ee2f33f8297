"""Risk's own Postgres tables: the durable copy of limits and kill switches (Redis holds the hot copy)."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, DateTime, MetaData, String, Table, Text, func
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()

limits_table = Table(
    "risk_limits",
    metadata,
    Column("account_id", UUID(as_uuid=True), primary_key=True),
    Column("limits", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

#: scope is "global" or an account id
kill_switches_table = Table(
    "risk_kill_switches",
    metadata,
    Column("scope", String(64), primary_key=True),
    Column("engaged", Boolean, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
