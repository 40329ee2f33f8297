"""Settings of the strategy-runner service (env vars; see papertrade.settings for the common ones)."""

from __future__ import annotations

from typing import ClassVar

from papertrade.settings import ServiceSettings


class StrategyRunnerSettings(ServiceSettings):
    service_name: ClassVar[str] = "strategy-runner"
