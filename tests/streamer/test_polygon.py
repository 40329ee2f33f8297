"""The Polygon client against a local fake: paging, 429 with retries, bad keys, crypto tickers, limits."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from papertrade.bars.polygon import (
    PolygonAuthError,
    PolygonClient,
    PolygonRateLimited,
    load_api_key,
    polygon_ticker,
)
from papertrade.enums import Interval
from tests.streamer.fake_polygon import GOOD_KEY, NO_PLAN_KEY, FakePolygon

START = datetime(2024, 3, 4, 14, 30, tzinfo=UTC)
END = datetime(2024, 3, 4, 21, 0, tzinfo=UTC)


@pytest.fixture
def fake() -> Iterator[FakePolygon]:
    with FakePolygon().running() as f:
        yield f


def _client(fake: FakePolygon, key: str = GOOD_KEY, **kw: object) -> PolygonClient:
    sleeps: list[float] = []
    client = PolygonClient(key, base_url=fake.url, sleep=sleeps.append, requests_per_minute=0, **kw)  # type: ignore[arg-type]
    client.sleeps = sleeps  # type: ignore[attr-defined]
    return client


def test_pages_are_followed_through_next_url(fake: FakePolygon) -> None:
    with _client(fake) as client:
        s = client.bars("AAPL", Interval.M1, START, END)
    assert len(s) == 5
    assert fake.requests[0].startswith("/v2/aggs/ticker/AAPL/range/1/minute/1709562600000/1709586000000?")
    assert "cursor=page2" in fake.requests[1] and "apiKey=good-key" in fake.requests[1]
    b = s.bar(0)
    assert b.t == START and (b.o, b.h, b.l, b.c, b.v) == (
        Decimal("174.98"),
        Decimal("175.07"),
        Decimal("174.91"),
        Decimal("175"),
        Decimal(1000),
    )
    assert s.bar(4).t == datetime(2024, 3, 4, 14, 34, tzinfo=UTC)


def test_crypto_symbols_are_asked_as_x_tickers(fake: FakePolygon) -> None:
    assert polygon_ticker("@BTCUSD") == "X:BTCUSD" and polygon_ticker("@ETH") == "X:ETHUSD"
    with _client(fake) as client:
        client.bars("@BTCUSD", Interval.H1, START, END)
    assert fake.requests[0].startswith("/v2/aggs/ticker/X:BTCUSD/range/1/hour/")


def test_429_is_retried_with_backoff(fake: FakePolygon) -> None:
    fake.throttle = 2
    with _client(fake) as client:
        s = client.bars("AAPL", Interval.M1, START, END)
        assert len(s) == 5
        assert client.sleeps == [0.0, 0.0]  # type: ignore[attr-defined]  # Retry-After: 0
    fake.throttle = 10
    with (
        _client(fake, max_retries=3) as client,
        pytest.raises(PolygonRateLimited, match=r"429 4 times.*maximum requests per minute"),
    ):
        client.bars("AAPL", Interval.M1, START, END)


def test_bad_key_and_missing_plan_fail_at_once_with_a_clear_message(fake: FakePolygon) -> None:
    with (
        _client(fake, key="wrong") as client,
        pytest.raises(PolygonAuthError, match=r"refused the key \(401\): Unknown API Key"),
    ):
        client.bars("AAPL", Interval.M1, START, END)
    with (
        _client(fake, key=NO_PLAN_KEY) as client,
        pytest.raises(PolygonAuthError, match=r"\(403\): You are not entitled"),
    ):
        client.bars("AAPL", Interval.M1, START, END)
    assert len(fake.requests) == 2  # no retries


def test_the_rate_limit_spaces_requests() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    client = PolygonClient("k", requests_per_minute=2, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        client._throttle()
        now[0] += 1.0
    assert sleeps == [58.0]


def test_the_key_comes_from_env_or_a_yaml_secret_file(tmp_path: Path) -> None:
    assert load_api_key({"POLYGON_API_KEY": "abc"}) == "abc"
    secret = tmp_path / "secret.yaml"
    secret.write_text("polygon_api_key: xyz\n")
    assert load_api_key({"POLYGON_SECRET_FILE": str(secret)}) == "xyz"
    secret.write_text("other: 1\n")
    with pytest.raises(PolygonAuthError, match="has no polygon_api_key"):
        load_api_key({"POLYGON_SECRET_FILE": str(secret)})
    with pytest.raises(PolygonAuthError, match="set POLYGON_API_KEY or POLYGON_SECRET_FILE"):
        load_api_key({})
