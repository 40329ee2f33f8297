"""Every service starts as `python -m <package>`, is alive and ready, and speaks the common endpoints."""

from __future__ import annotations

import httpx
import pytest

from papertrade.stack.services import SERVICES
from tests.conftest import ServiceStarter


@pytest.mark.parametrize("name", [s.name for s in SERVICES])
def test_service_is_healthy_ready_and_documented(name: str, start_services: ServiceStarter) -> None:
    _, url = start_services(name)
    with httpx.Client(base_url=url, timeout=5) as client:
        assert client.get("/healthz").json() == {"status": "ok", "service": name}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert all(v == "ok" for v in ready.json()["checks"].values())
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "papertrade_http_requests_total" in metrics.text
        assert client.get("/openapi.json").json()["info"]["title"]
        assert client.get("/docs").status_code == 200
        missing = client.get("/no/such/route")
        assert missing.status_code == 404
        assert set(missing.json()) == {"code", "message"} and missing.json()["code"] == 40410000
        # no trailing-slash redirects
        assert client.get("/healthz/", follow_redirects=False).status_code == 404
