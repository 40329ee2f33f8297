"""Settings of the broker service (env vars; see papertrade.settings for the common ones)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from papertrade.settings import ServiceSettings


class BrokerSettings(ServiceSettings):
    service_name: ClassVar[str] = "broker"

    #: Seconds to wait for risk's answer before refusing the order (`BROKER_RISK_TIMEOUT`).
    risk_timeout: float = Field(2.0, validation_alias="BROKER_RISK_TIMEOUT")
    #: The most orders the broker puts in one risk.check request (`BROKER_RISK_BATCH`: one request per
    #: this many orders of a group commit, the array form; 1 sends each order alone, in the single form).
    risk_batch: int = Field(64, validation_alias="BROKER_RISK_BATCH", ge=1, le=1024)
    #: The durable JetStream consumer of execution reports (`BROKER_LEDGER_DURABLE`).
    ledger_durable: str = Field("broker-ledger", validation_alias="BROKER_LEDGER_DURABLE")
    #: Run the ledger process as a batch worker (`BROKER_LEDGER_SCHED_BATCH`, Linux `SCHED_BATCH`): its
    #: wake-ups then never preempt the order path on a busy machine; its share of the CPUs is unchanged.
    ledger_sched_batch: bool = Field(True, validation_alias="BROKER_LEDGER_SCHED_BATCH")
    #: Postgres connections the broker keeps (and as many again on a burst) (`BROKER_DB_POOL_SIZE`).
    db_pool_size: int = Field(30, validation_alias="BROKER_DB_POOL_SIZE", ge=1, le=200)
    #: Seconds after start-up before the orders a stopped broker left between commit and command are
    #: recovered (`BROKER_RECOVERY_GRACE`; `papertrade_broker.recovery`).
    recovery_grace: float = Field(5.0, validation_alias="BROKER_RECOVERY_GRACE", ge=0.0, le=3600.0)
    #: Run Alembic migrations at start-up (`BROKER_MIGRATE`).
    migrate: bool = Field(True, validation_alias="BROKER_MIGRATE")
