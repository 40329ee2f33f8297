"""Key pairs: one scrypt check per pair however many requests bring it at once; wrong ones refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.broker.conftest import Broker


def test_concurrent_first_requests_of_a_key_pair_share_one_scrypt_check(broker: Broker) -> None:
    acct = broker.new_account()
    before = _key_checks(broker)

    def get_account(_: int) -> int:
        with broker.client(acct) as c:
            return c.get("/v2/account").status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(get_account, range(32)))
    assert statuses == [200] * 32
    assert _key_checks(broker) - before == 1


def test_concurrent_wrong_secrets_are_all_refused(broker: Broker) -> None:
    acct = broker.new_account()
    secret = acct["api_secret_key"]
    wrong = {**acct, "api_secret_key": secret[:-1] + ("y" if secret.endswith("x") else "x")}

    def get_account(_: int) -> tuple[int, str]:
        with broker.client(wrong) as c:
            r = c.get("/v2/account")
            return r.status_code, r.json()["message"]

    with ThreadPoolExecutor(8) as pool:
        answers = set(pool.map(get_account, range(16)))
    assert answers == {(401, "request is not authorized: unknown key id or wrong secret")}
    with broker.client(acct) as c:  # the right pair still works
        assert c.get("/v2/account").status_code == 200


def _key_checks(broker: Broker) -> float:
    text = httpx.get(f"{broker.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("papertrade_broker_key_checks_total "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
