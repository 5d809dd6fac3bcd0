"""One event, two rules: each call is made once, even across retries and runs."""

from __future__ import annotations

import pytest
import redis

from tests.harness import (
    COPERNICA_TOKEN,
    shopify_headers,
    started_relay,
    wait_for_job,
    writes,
)
from tests.standin.copernica import CopernicaStandIn, Fault

pytestmark = pytest.mark.e2e

MAPPING = """
rules:
  - name: main-database
    source: shopify
    topics: [customers/create]
    database: 1234
    key: [email]
    create: true
    fields: {email: email, firstname: first_name}
  - name: newsletter-database
    source: shopify
    topics: [customers/create]
    database: 5678
    key: [email]
    create: true
    fields: {email: email}
"""


@pytest.fixture(scope="module")
def standin():
    with CopernicaStandIn(
        access_token=COPERNICA_TOKEN,
        databases={1234: ["email", "firstname"], 5678: ["email"]},
        put_status=303,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def relay(redis_server, standin, tmp_path_factory):
    relay = started_relay(
        redis_server.url,
        standin.base_url,
        tmp_path_factory.mktemp("several-rules"),
        MAPPING,
        RELAY_QUEUE="several-rules",
        COPERNICA_CONNECT_TIMEOUT="1",
        COPERNICA_READ_TIMEOUT="24",
    )
    yield relay
    relay.stop()


def paths(standin) -> list[tuple[str, int]]:
    return [(r.path.split("/")[3], r.status) for r in writes(standin)]


def test_retry_repeats_only_the_call_that_failed(relay, standin, redis_server):
    standin.add_fault(Fault(method="PUT", status=503, path_contains="/database/5678/"))
    body = b'{"id":1,"email":"both@example.com","first_name":"Both"}'

    response = relay.post("shopify", body, shopify_headers(body, "customers/create"))
    job = wait_for_job(redis.Redis.from_url(redis_server.url), response.json()["job"])

    assert job.get_status() == "finished", relay.logs()[-2000:]
    assert paths(standin) == [("1234", 303), ("5678", 503), ("5678", 303)]
    assert [c["rule"] for c in job.return_value()["calls"]] == [
        "main-database",
        "newsletter-database",
    ]


def test_second_call_that_might_outlive_the_job_runs_in_a_fresh_run(
    relay, standin, redis_server
):
    # 1 s connect + 24 s read may take 25 s; after a 3 s first call, less
    # than that is left of the job's 27 s, so the second call waits a run.
    standin.add_fault(
        Fault(method="PUT", status=None, delay=3, path_contains="/database/1234/")
    )
    body = b'{"id":2,"email":"slow@example.com","first_name":"Slow"}'

    response = relay.post("shopify", body, shopify_headers(body, "customers/create"))
    job = wait_for_job(redis.Redis.from_url(redis_server.url), response.json()["job"])

    assert job.get_status() == "finished", relay.logs()[-2000:]
    assert paths(standin) == [("1234", 303), ("5678", 303)]
    assert "delivery continues in a new run" in relay.logs()
    assert job.meta.get("failures", 0) == 0
