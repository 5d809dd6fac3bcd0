"""A running relay per test module: gunicorn, one worker, the Copernica stand-in."""

from __future__ import annotations

import pytest

from tests.harness import (
    COPERNICA_TOKEN,
    DATABASE_FIELDS,
    ORDER_FIELDS,
    Relay,
    relay_env,
)
from tests.standin.copernica import CopernicaStandIn


@pytest.fixture(scope="module", params=[1, 4], ids=["api-v1", "api-v4"])
def api_version(request):
    """The same end-to-end tests run against Copernica's API v1 and v4."""
    return request.param


@pytest.fixture(scope="module")
def standin(api_version):
    with CopernicaStandIn(
        access_token=COPERNICA_TOKEN,
        databases={1234: DATABASE_FIELDS},
        collections={1234: {"orders": ORDER_FIELDS}},
        put_status=303,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def relay(redis_server, standin, api_version, tmp_path_factory):
    relay = Relay(
        env=relay_env(
            redis_server.url,
            standin.base_url,
            COPERNICA_API_VERSION=str(api_version),
            COPERNICA_AUTH_URL=f"{standin.base_url}/authenticate",
            RELAY_QUEUE=f"deliveries-v{api_version}",
        ),
        log_dir=tmp_path_factory.mktemp("relay-logs"),
    )
    relay.start_web()
    relay.start_worker()
    yield relay
    relay.stop()


@pytest.fixture(autouse=True)
def fresh_state(request, redis_server):
    """Each test starts with no stand-in history and no relay memory."""
    if "standin" in request.fixturenames:
        request.getfixturevalue("standin").clear()
    import redis

    client = redis.Redis.from_url(redis_server.url)
    # The relay's memory of earlier tests: dedupe keys, order marks, locks,
    # cached field lists and JWTs (the stand-in is new per module).
    for key in client.scan_iter("relay:*"):
        client.delete(key)
    client.close()
