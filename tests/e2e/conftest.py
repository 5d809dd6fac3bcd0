"""A running relay per test module: gunicorn, one worker, the Copernica stand-in."""

from __future__ import annotations

import pytest

from tests.harness import COPERNICA_TOKEN, Relay, relay_env
from tests.standin.copernica import CopernicaStandIn

DATABASE_FIELDS = [
    "email",
    "firstname",
    "lastname",
    "phone",
    "shopify_customer_id",
    "city",
    "country",
    "last_order_number",
    "last_order_date",
    "last_order_total",
    "last_order_currency",
    "last_order_status",
    "email_consent",
    "email_consent_level",
    "email_consent_updated",
    "typeform_submitted",
]


@pytest.fixture(scope="module")
def standin():
    with CopernicaStandIn(
        access_token=COPERNICA_TOKEN,
        databases={1234: DATABASE_FIELDS},
        put_status=303,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def relay(redis_server, standin, tmp_path_factory):
    relay = Relay(
        env=relay_env(redis_server.url, standin.base_url),
        log_dir=tmp_path_factory.mktemp("relay-logs"),
    )
    relay.start_web()
    relay.start_worker()
    yield relay
    relay.stop()


@pytest.fixture(autouse=True)
def fresh_state(request, redis_server):
    """Each test starts with no stand-in history and no dedupe keys."""
    if "standin" in request.fixturenames:
        request.getfixturevalue("standin").clear()
    import redis

    client = redis.Redis.from_url(redis_server.url)
    for key in client.scan_iter("relay:dedupe:*"):
        client.delete(key)
    client.close()
