"""Bad input on every route (schemathesis on the broker's OpenAPI schema): never a 5xx, always Alpaca errors.

Positive and negative cases are generated for every operation of `/openapi.json`; the calls carry a
valid key pair and the admin token so that generated data reaches the handlers (401s are tested
elsewhere).
"""

from __future__ import annotations

from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.broker.conftest import Broker, key_headers
from tests.conftest import ADMIN_TOKEN

EXAMPLES = 12


def test_no_server_errors_on_any_route(broker: Broker) -> None:
    schema = schemathesis.openapi.from_url(f"{broker.url}/openapi.json")
    acct = broker.new_account(cash="1000000")
    auth = {**key_headers(acct), "Authorization": f"Bearer {ADMIN_TOKEN}"}
    session = requests.Session()
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
            )
            def check(case: Any) -> None:
                headers = dict(case.headers or {})
                headers.update(auth)
                case.headers = headers
                response = case.call(base_url=broker.url, session=session, allow_redirects=False)
                where = f"{case.method} {case.formatted_path} query={case.query} body={case.body!r}"
                if response.status_code >= 500:
                    failures.append(f"{where}: {response.status_code} {response.text[:200]}")
                if response.status_code in (301, 302, 307, 308):
                    failures.append(f"{where}: redirect {response.status_code}")
                if response.status_code >= 400:
                    body = response.json()
                    if not (isinstance(body, dict) and {"code", "message"} <= set(body)) or "detail" in body:
                        failures.append(f"{where}: not an Alpaca error body: {body}")

            try:
                check()
            except Unsatisfiable:  # e.g. no negative case exists for an operation without parameters
                continue
    assert not failures, "\n".join(failures[:20])
