from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from papertrade import calendar
from papertrade.settings import Settings
from papertrade.stack.services import SERVICES, spec
from papertrade_broker.settings import BrokerSettings
from papertrade_strategy_runner.settings import StrategyRunnerSettings


def test_env_vars_of_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://n:1")
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u@h:2/db")
    monkeypatch.setenv("REDIS_URL", "redis://r:3/0")
    monkeypatch.setenv("PAPERTRADE_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    s = Settings()
    assert (s.nats_url, s.database_url, s.redis_url, s.log_level) == (
        "nats://n:1",
        "postgresql+psycopg://u@h:2/db",
        "redis://r:3/0",
        "DEBUG",
    )
    assert s.admin_token_value == "s3cret"
    assert "s3cret" not in repr(s)  # secrets never printed


def test_admin_token_from_a_secret_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PAPERTRADE_ADMIN_TOKEN", raising=False)
    f = tmp_path / "token"
    f.write_text("from-file\n")
    monkeypatch.setenv("PAPERTRADE_ADMIN_TOKEN_FILE", str(f))
    assert Settings().admin_token_value == "from-file"


def test_service_port_defaults_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_PORT", raising=False)
    assert BrokerSettings().port == 8000
    monkeypatch.setenv("BROKER_PORT", "18000")
    assert BrokerSettings().port == 18000
    monkeypatch.setenv("STRATEGY_RUNNER_PORT", "18004")
    assert StrategyRunnerSettings().port == 18004
    assert [s.port for s in SERVICES] == [8000, 8001, 8002, 8003, 8004]
    assert spec("strategy-runner").port_env == "STRATEGY_RUNNER_PORT"
    with pytest.raises(KeyError):
        spec("nope")


def test_calendar_holidays_half_days_and_dst() -> None:
    # 2024-07-04 is a holiday; 2024-11-29 closes at 13:00 New York; DST began 2024-03-10.
    assert calendar.session_bounds(date(2024, 7, 4)) is None
    bounds = calendar.session_bounds(date(2024, 11, 29))
    assert bounds is not None and bounds[1] == datetime(2024, 11, 29, 18, 0, tzinfo=UTC)
    assert calendar.session_bounds(date(2024, 3, 8)) == (
        datetime(2024, 3, 8, 14, 30, tzinfo=UTC),
        datetime(2024, 3, 8, 21, 0, tzinfo=UTC),
    )
    assert calendar.session_bounds(date(2024, 3, 11)) == (
        datetime(2024, 3, 11, 13, 30, tzinfo=UTC),
        datetime(2024, 3, 11, 20, 0, tzinfo=UTC),
    )
    assert calendar.is_open(datetime(2024, 3, 11, 13, 30, tzinfo=UTC))
    assert not calendar.is_open(datetime(2024, 3, 11, 13, 29, tzinfo=UTC))
    assert calendar.is_open(datetime(2024, 7, 4, 15, 0, tzinfo=UTC), "@BTCUSD")
    assert calendar.session_of(datetime(2024, 3, 11, 19, 59, tzinfo=UTC)) == date(2024, 3, 11)
    assert calendar.session_of(datetime(2024, 3, 11, 20, 0, tzinfo=UTC)) is None
    assert calendar.next_open(datetime(2024, 7, 3, 21, 0, tzinfo=UTC)) == datetime(
        2024, 7, 5, 13, 30, tzinfo=UTC
    )
    assert len(calendar.sessions(date(2024, 1, 1), date(2024, 12, 31))) == 252
