"""Settings of the risk service (env vars; see papertrade.settings for the common ones)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from papertrade.settings import ServiceSettings


class RiskSettings(ServiceSettings):
    service_name: ClassVar[str] = "risk"

    #: Run the Alembic migrations at start-up (`RISK_MIGRATE`).
    migrate: bool = Field(True, validation_alias="RISK_MIGRATE")
    #: The durable JetStream consumer of `ex.exec.>` shared by the replicas (`RISK_DURABLE`).
    durable: str = Field("risk", validation_alias="RISK_DURABLE")
    #: Seconds a Redis call may take before the check fails closed (`RISK_REDIS_TIMEOUT`).
    redis_timeout: float = Field(1.0, validation_alias="RISK_REDIS_TIMEOUT")
    #: Seconds an account's ownership lease lasts; the owner renews it every quarter (`RISK_LEASE`).
    lease: float = Field(2.0, gt=0.05, le=60.0, validation_alias="RISK_LEASE")
    #: Seconds the owner waits before writing its state changes behind to Redis (`RISK_FLUSH`).
    flush: float = Field(0.005, ge=0.0, le=1.0, validation_alias="RISK_FLUSH")
