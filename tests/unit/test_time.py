from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from papertrade.errors import ValidationError
from papertrade.timeutil import floor_time, iso, local_zone, parse_time, to_local

NY = ZoneInfo("America/New_York")


def test_iso_strings_with_z_or_offset_become_utc() -> None:
    assert parse_time("2024-01-02T14:30:00Z") == datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    assert parse_time("2024-01-02T09:30:00-05:00") == datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def test_naive_means_the_users_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAPERTRADE_TZ", "America/New_York")
    assert local_zone() == NY
    assert parse_time("2024-07-01T09:30:00") == datetime(2024, 7, 1, 13, 30, tzinfo=UTC)  # EDT
    assert parse_time(datetime(2024, 1, 2, 9, 30)) == datetime(2024, 1, 2, 14, 30, tzinfo=UTC)  # EST
    assert parse_time(date(2024, 1, 2)) == datetime(2024, 1, 2, 5, 0, tzinfo=UTC)


def test_explicit_zone_overrides_local() -> None:
    assert parse_time("2024-01-02 12:00", tz=UTC) == datetime(2024, 1, 2, 12, tzinfo=UTC)


def test_epoch_seconds() -> None:
    assert parse_time(0) == datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["yesterday", "2024-13-01", "", "   "])
def test_unparseable_times_name_the_field(bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_time(bad, "start")
    assert err.value.field == "start"


def test_wrong_type() -> None:
    with pytest.raises(ValidationError, match="start: expected an ISO 8601"):
        parse_time([2024], "start")


def test_iso_output() -> None:
    assert iso(datetime(2024, 1, 2, 14, 30, tzinfo=UTC)) == "2024-01-02T14:30:00Z"
    assert iso(datetime(2024, 1, 2, 9, 30, 0, 5, tzinfo=timezone(timedelta(hours=-5)))) == (
        "2024-01-02T14:30:00.000005Z"
    )
    with pytest.raises(ValueError):
        iso(datetime(2024, 1, 2))


def test_display_in_local_zone_and_floor() -> None:
    t = datetime(2024, 1, 2, 14, 30, 59, tzinfo=UTC)
    assert to_local(t, NY).hour == 9
    assert floor_time(t, 300) == datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
