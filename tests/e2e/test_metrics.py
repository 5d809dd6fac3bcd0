"""/metrics on a real run: two gunicorn processes, a worker, Redis, the stand-in.

The webhook counts come from both gunicorn processes, the delivery and
Copernica counts from the worker process, the queue figures from Redis at
scrape time; every scrape, whichever process answers it, shows the same.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import MINUTE_PREFIX
from tests.harness import (
    COPERNICA_TOKEN,
    DATABASE_FIELDS,
    ORDER_FIELDS,
    Relay,
    fixture_bytes,
    relay_env,
    shopify_headers,
    typeform_headers,
    wait_for_job,
    wait_for_log,
)
from tests.standin.copernica import CopernicaStandIn, Fault
from tools.embedded_redis import RedisServer

pytestmark = pytest.mark.e2e

TOKEN = "metrics-token-" + "m" * 20
QUEUE = "deliveries-metrics"


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """A Redis of its own: the figures checked here are exact totals."""
    server = RedisServer(tmp_path_factory.mktemp("metrics-redis"), unix_socket=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def standin():
    with CopernicaStandIn(
        access_token=COPERNICA_TOKEN,
        databases={1234: DATABASE_FIELDS},
        collections={1234: {"orders": ORDER_FIELDS}},
        put_status=303,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def relay(own_redis, standin, tmp_path_factory):
    relay = Relay(
        env=relay_env(
            own_redis.url,
            standin.base_url,
            RELAY_METRICS_TOKEN=TOKEN,
            RELAY_QUEUE=QUEUE,
            WEB_CONCURRENCY="2",
        ),
        log_dir=tmp_path_factory.mktemp("metrics-logs"),
    )
    relay.start_web()
    relay.start_worker()
    yield relay
    relay.stop()


def scrape(relay: Relay) -> dict[tuple, float]:
    answer = requests.get(
        f"{relay.url}/metrics",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    found = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def total(found: dict, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        amount
        for (sample, series), amount in found.items()
        if sample == name and wanted <= set(series)
    )


def scrape_until(relay: Relay, ready, timeout: float = 15.0) -> dict:
    """Scrape until ``ready(found)``; the processes flush every 2 s."""
    deadline = time.monotonic() + timeout
    found = scrape(relay)
    while not ready(found) and time.monotonic() < deadline:
        time.sleep(0.3)
        found = scrape(relay)
    return found


def post_customer(relay: Relay, delivery_id: str | None = None):
    body = fixture_bytes("shopify/customers_create.json")
    headers = shopify_headers(body, "customers/create", delivery_id)
    return relay.post("shopify", body, headers)


def test_metrics_need_the_token(relay):
    url = f"{relay.url}/metrics"
    assert requests.get(url, timeout=5).status_code == 401
    for header in (f"Bearer {TOKEN}x", TOKEN, f"Basic {TOKEN}"):
        answer = requests.get(url, headers={"Authorization": header}, timeout=5)
        assert answer.status_code == 401
        assert TOKEN not in answer.text
    assert TOKEN not in relay.logs()


def test_a_run_shows_in_the_metrics(relay, standin, own_redis):
    connection = redis.Redis.from_url(own_redis.url)
    minute = int(time.time() // 60)

    # A delivery Copernica refuses for good, then one it refuses once.
    standin.add_fault(Fault(method="PUT", status=400, message="Invalid data"))
    refused = post_customer(relay)
    assert refused.status_code == 202
    assert wait_for_job(connection, refused.json()["job"]).get_status() == "failed"
    standin.add_fault(Fault(method="PUT", status=503))
    retried = post_customer(relay)
    assert wait_for_job(connection, retried.json()["job"]).get_status() == "finished"

    # Several more, over both gunicorn processes, one of them sent twice.
    sent = [post_customer(relay) for _ in range(4)]
    again = post_customer(relay, sent[0].request.headers["X-Shopify-Webhook-Id"])
    body = fixture_bytes("typeform/form_response.json")
    form = relay.post("typeform", body, typeform_headers(body))
    forged = relay.post("typeform", body, typeform_headers(body, secret="wrong"))
    assert [a.status_code for a in (*sent, form)] == [202] * 5
    assert (again.status_code, forged.status_code) == (200, 401)
    for answer in (*sent, form):
        wait_for_job(connection, answer.json()["job"])

    shopify = {"source": "shopify", "topic": "customers/create"}
    found = scrape_until(
        relay,
        lambda found: (
            total(found, "relay_deliveries_total", outcome="applied") >= 6
            and total(found, "relay_webhooks_received_total") >= 9
        ),
    )

    # Webhooks, as answered by both web processes.
    received = "relay_webhooks_received_total"
    assert value(found, received, outcome="queued", reason="", **shopify) == 6
    assert value(found, received, outcome="duplicate", reason="", **shopify) == 1
    assert (
        value(
            found,
            received,
            source="typeform",
            topic="form_response",
            outcome="queued",
            reason="",
        )
        == 1
    )
    assert (
        value(
            found,
            received,
            source="typeform",
            topic="unknown",
            outcome="rejected",
            reason="signature",
        )
        == 1
    )
    assert total(found, "relay_webhook_ack_seconds_count") == 9

    # Deliveries and calls, as counted by the worker process.
    deliveries = "relay_deliveries_total"
    assert value(found, deliveries, outcome="failed", reason="refused", **shopify) == 1
    assert value(found, deliveries, outcome="retried", reason="5xx", **shopify) == 1
    assert value(found, deliveries, outcome="applied", reason="", **shopify) == 5
    assert total(found, deliveries, source="typeform", outcome="applied") == 1
    calls = "relay_copernica_calls_total"
    assert value(found, calls, method="PUT", status_class="4xx") == 1
    assert value(found, calls, method="PUT", status_class="5xx") == 1
    assert value(found, calls, method="PUT", status_class="3xx") >= 6
    assert value(found, calls, method="GET", status_class="2xx") >= 1
    assert total(found, "relay_copernica_call_seconds_count") >= 9
    # The fixtures' events happened months before this run.
    lag = value(found, "relay_delivery_lag_seconds_count", source="shopify")
    assert lag == 5
    assert value(found, "relay_delivery_lag_seconds_sum", source="shopify") > 86400

    # The queue, read from Redis at scrape time.
    assert value(found, "relay_queue_depth") == 0
    assert value(found, "relay_queue_oldest_age_seconds") == 0
    assert value(found, "relay_retries_scheduled") == 0
    assert value(found, "relay_deliveries_failed") == 1
    assert value(found, "relay_workers") == 1

    # Every scrape agrees, whichever gunicorn process answers it.
    for _ in range(4):
        again_found = scrape(relay)
        assert total(again_found, received) == total(found, received)
        assert total(again_found, deliveries) == total(found, deliveries)

    # The operator page's per-minute series count the same events.
    minutes = range(minute, int(time.time() // 60) + 1)
    series = {
        kind: sum(
            int(connection.get(f"{MINUTE_PREFIX}{kind}:{m}") or 0) for m in minutes
        )
        for kind in ("received", "delivered")
    }
    assert series == {"received": 7, "delivered": 6}

    # Each delivery attempt has its one line, with what a person needs.
    ended = wait_for_log(relay, "delivery attempt ended")
    assert {"delivery", "source", "topic", "attempt", "outcome", "duration_ms"} <= set(
        ended
    )
    connection.close()


def test_waiting_deliveries_show_as_queue_depth_and_age(relay):
    worker = relay.workers[0]
    worker.stop()  # SIGTERM: it finishes, adds its last counts and exits
    try:
        for _ in range(2):
            assert post_customer(relay).status_code == 202
        time.sleep(1.1)
        found = scrape(relay)
        assert value(found, "relay_queue_depth") == 2
        assert value(found, "relay_queue_oldest_age_seconds") >= 1
        assert value(found, "relay_workers") == 0
    finally:
        relay.workers.remove(worker)
        relay.start_worker()


def test_webhook_lines_name_delivery_source_topic_outcome_and_duration(relay):
    delivery = str(uuid.uuid4())
    assert post_customer(relay, delivery).status_code == 202
    deadline = time.monotonic() + 10
    line = None
    while line is None and time.monotonic() < deadline:
        for text in relay.web.output().splitlines():
            if text.startswith("{") and delivery in text:
                line = json.loads(text)
        time.sleep(0.1)
    assert line is not None
    assert line["event"] == "webhook queued"
    assert (line["source"], line["topic"], line["outcome"]) == (
        "shopify",
        "customers/create",
        "queued",
    )
    assert line["delivery"] == delivery and line["duration_ms"] >= 0
