"""Settings from env vars (pydantic-settings), the names of CONTRACT.md.

`NATS_URL`, `DATABASE_URL`, `REDIS_URL`, `PAPERTRADE_ADMIN_TOKEN` (or `PAPERTRADE_ADMIN_TOKEN_FILE`),
`LOG_LEVEL`, `LOG_FORMAT` (json or console), `<SERVICE>_PORT`, `<SERVICE>_HOST`, and each service's URL
(`BROKER_URL`, ...) for the services that call another over HTTP. A service subclasses
`ServiceSettings` for its own options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from papertrade.stack.services import spec


class Settings(BaseSettings):
    """What every process of the stack reads."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)

    nats_url: str = Field("nats://127.0.0.1:4222", validation_alias="NATS_URL")
    database_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/papertrade", validation_alias="DATABASE_URL"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    admin_token: SecretStr | None = Field(None, validation_alias="PAPERTRADE_ADMIN_TOKEN")
    admin_token_file: Path | None = Field(None, validation_alias="PAPERTRADE_ADMIN_TOKEN_FILE")
    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")
    log_format: Literal["json", "console"] = Field("json", validation_alias="LOG_FORMAT")

    broker_url: str = Field("http://127.0.0.1:8000", validation_alias="BROKER_URL")
    streamer_url: str = Field("http://127.0.0.1:8001", validation_alias="STREAMER_URL")
    orderbook_url: str = Field("http://127.0.0.1:8002", validation_alias="ORDERBOOK_URL")
    risk_url: str = Field("http://127.0.0.1:8003", validation_alias="RISK_URL")
    strategy_runner_url: str = Field("http://127.0.0.1:8004", validation_alias="STRATEGY_RUNNER_URL")

    @model_validator(mode="after")
    def _read_admin_token_file(self) -> Settings:
        if self.admin_token is None and self.admin_token_file is not None:
            text = self.admin_token_file.read_text().strip()
            if text:
                self.admin_token = SecretStr(text)
        return self

    @property
    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token is not None else None


class ServiceSettings(Settings):
    """Settings of one service: `service_name` picks `<SERVICE>_PORT` and `<SERVICE>_HOST`."""

    service_name: ClassVar[str] = ""

    host: str = "127.0.0.1"
    port: int = 0

    def __init__(self, **values: Any) -> None:
        import os

        s = spec(self.service_name)
        values.setdefault("port", int(os.environ.get(s.port_env, s.port)))
        values.setdefault("host", os.environ.get(f"{s.env_prefix}_HOST", "127.0.0.1"))
        super().__init__(**values)
