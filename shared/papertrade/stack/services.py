"""The five services, defined once: name, Python module, port and the env var that moves the port.

`make up` (papertrade.stack.runner), the settings defaults and the test that checks docker-compose.yml
all read this table, so the local runner and compose describe the same stack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    port: int
    directory: str

    @property
    def env_prefix(self) -> str:
        return self.name.upper().replace("-", "_")

    @property
    def port_env(self) -> str:
        return f"{self.env_prefix}_PORT"

    @property
    def url_env(self) -> str:
        return f"{self.env_prefix}_URL"


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("broker", "papertrade_broker", 8000, "services/broker"),
    ServiceSpec("streamer", "papertrade_streamer", 8001, "services/streamer"),
    ServiceSpec("orderbook", "papertrade_orderbook", 8002, "services/orderbook"),
    ServiceSpec("risk", "papertrade_risk", 8003, "services/risk"),
    ServiceSpec("strategy-runner", "papertrade_strategy_runner", 8004, "services/strategy-runner"),
)

#: Env vars every service reads (CONTRACT.md), besides its own `<SERVICE>_PORT`.
COMMON_ENV: tuple[str, ...] = (
    "NATS_URL",
    "DATABASE_URL",
    "REDIS_URL",
    "PAPERTRADE_ADMIN_TOKEN",
    "LOG_LEVEL",
)

#: The order in which the runner starts services (a service's dependencies first).
START_ORDER: tuple[str, ...] = ("streamer", "orderbook", "risk", "broker", "strategy-runner")

#: The services a service needs *ready* before it starts, because it calls them over HTTP at start-up
#: (the strategy-runner resumes its deployments through the broker). The others talk over NATS and
#: JetStream, which keeps messages for a late consumer, so they start together. `make up` and
#: docker-compose.yml (`depends_on`, besides nats/postgres/redis) both follow this table.
DEPENDS_ON: dict[str, tuple[str, ...]] = {"strategy-runner": ("broker",)}


def spec(name: str) -> ServiceSpec:
    for s in SERVICES:
        if s.name == name:
            return s
    raise KeyError(f"unknown service {name!r}; known: {', '.join(s.name for s in SERVICES)}")
