"""Metrics: counted per process, added up in Redis, rendered for Prometheus."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry

from app.metrics import (
    METRICS_KEY,
    MINUTE_PREFIX,
    MINUTE_TTL_SECONDS,
    Recorder,
    known_topics,
    queue_gauges,
    render,
    status_class,
)
from app.metrics_view import authorized
from app.settings import ConfigurationError, load_settings
from tools.embedded_redis import free_port
from worker.mapping import load_rules

TOPICS = known_topics(load_rules(load_settings({})))


def recorder() -> Recorder:
    made = Recorder(interval=3600)  # flushed by hand in these tests
    made.topics = TOPICS
    return made


def stored_of(*recorders: Recorder) -> dict[str, float]:
    """What Redis would hold after each recorder flushed once."""
    total: dict[str, float] = {}
    for each in recorders:
        for name, amount in each.take().fields.items():
            total[name] = total.get(name, 0) + amount
    return total


def samples(text: bytes) -> dict[tuple, float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def key(name: str, **labels: str) -> tuple:
    return (name, tuple(sorted(labels.items())))


def test_webhooks_are_counted_by_source_topic_outcome_and_reason():
    one, two = recorder(), recorder()  # two gunicorn processes
    one.webhook("shopify", "customers/create", "queued", "", 0.004)
    two.webhook("shopify", "customers/create", "queued", "", 0.02)
    two.webhook("shopify", "customers/create", "duplicate", "", 0.003)
    one.webhook("typeform", None, "rejected", "signature", 0.001)

    found = samples(render(stored_of(one, two), {}))

    queued = dict(source="shopify", topic="customers/create", reason="")
    assert found[key("relay_webhooks_received_total", outcome="queued", **queued)] == 2
    assert (
        found[key("relay_webhooks_received_total", outcome="duplicate", **queued)] == 1
    )
    rejected = key(
        "relay_webhooks_received_total",
        source="typeform",
        topic="unknown",
        outcome="rejected",
        reason="signature",
    )
    assert found[rejected] == 1


def test_unknown_sources_and_topics_become_other():
    made = recorder()
    made.webhook("shopify", "products/update", "queued", "", 0.01)
    made.webhook("gitlab", "push", "rejected", "unknown_source", 0.01)
    made.delivery("shopify", "x" * 500, "skipped", "unmapped")

    found = samples(render(stored_of(made), {}))

    assert not any(("topic", "products/update") in labels for _, labels in found)
    assert found[
        key(
            "relay_webhooks_received_total",
            source="shopify",
            topic="other",
            outcome="queued",
            reason="",
        )
    ]
    assert found[
        key(
            "relay_webhooks_received_total",
            source="other",
            topic="other",
            outcome="rejected",
            reason="unknown_source",
        )
    ]
    assert found[
        key(
            "relay_deliveries_total",
            source="shopify",
            topic="other",
            outcome="skipped",
            reason="unmapped",
        )
    ]


def test_histogram_buckets_are_cumulative_and_count_past_the_last_bound():
    made = recorder()
    for seconds in (0.003, 0.2, 60.0):
        made.call("PUT", 200, seconds)

    found = samples(render(stored_of(made), {}))

    name = "relay_copernica_call_seconds"
    assert found[key(f"{name}_bucket", method="PUT", le="0.01")] == 1
    assert found[key(f"{name}_bucket", method="PUT", le="0.25")] == 2
    assert found[key(f"{name}_bucket", method="PUT", le="20.0")] == 2
    assert found[key(f"{name}_bucket", method="PUT", le="+Inf")] == 3
    assert found[key(f"{name}_count", method="PUT")] == 3
    assert found[key(f"{name}_sum", method="PUT")] == pytest.approx(60.203)
    assert found[key("relay_copernica_calls_total", method="PUT", status_class="2xx")]


def test_delivery_lag_is_observed_and_never_negative():
    made = recorder()
    made.delivery("typeform", "form_response", "applied", "", lag_seconds=-3)
    made.delivery("typeform", "form_response", "applied", "", lag_seconds=100)

    found = samples(render(stored_of(made), {}))

    name = "relay_delivery_lag_seconds"
    assert found[key(f"{name}_bucket", source="typeform", le="1.0")] == 1
    assert found[key(f"{name}_bucket", source="typeform", le="120.0")] == 2
    assert found[key(f"{name}_sum", source="typeform")] == 100


def test_status_classes():
    assert [status_class(s) for s in (200, 303, 400, 429, 503, 0, None)] == [
        "2xx",
        "3xx",
        "4xx",
        "4xx",
        "5xx",
        "error",
        "error",
    ]


def test_gauges_render_and_unknown_stored_fields_are_ignored():
    stored = {b'["relay_gone",[],""]': b"3", b"not json": b"1"}
    found = samples(render(stored, {"relay_queue_depth": 4}))
    assert found[key("relay_queue_depth")] == 4
    assert not any(name == "relay_gone" for name, _ in found)


def test_flushes_of_several_processes_add_up_in_redis(redis_client):
    redis_client.delete(METRICS_KEY)
    one, two = recorder(), recorder()
    one.bind(redis_client)
    two.bind(redis_client)
    moment = time.time()
    minute = int(moment // 60)
    for made in (one, two):
        made.webhook("shopify", "orders/create", "queued", "", 0.01)
        made.delivery("shopify", "orders/create", "applied", "", lag_seconds=2.5)
        made.delivery("shopify", "orders/create", "retried", "5xx")
        made.tick("delivered", moment)  # one more, at a known minute
        assert made.flush()

    found = samples(render(redis_client.hgetall(METRICS_KEY), {}))

    labels = dict(source="shopify", topic="orders/create")
    assert found[key("relay_deliveries_total", outcome="applied", reason="", **labels)]
    assert (
        found[
            key("relay_webhooks_received_total", outcome="queued", reason="", **labels)
        ]
        == 2
    )
    assert found[key("relay_delivery_lag_seconds_sum", source="shopify")] == 5.0

    received = f"{MINUTE_PREFIX}received:{minute}"
    delivered = f"{MINUTE_PREFIX}delivered:{minute}"
    if int(time.time() // 60) == minute:  # the minute did not turn meanwhile
        assert int(redis_client.get(received)) == 2
        assert int(redis_client.get(delivered)) == 4  # applied twice, ticked twice
    assert 0 < redis_client.ttl(delivered) <= MINUTE_TTL_SECONDS


def test_counts_survive_a_failed_flush(redis_client):
    redis_client.delete(METRICS_KEY)
    made = recorder()
    away = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    made.bind(away)
    made.webhook("typeform", "form_response", "queued", "", 0.01)
    assert not made.flush()

    made.bind(redis_client)
    assert made.flush()
    found = samples(render(redis_client.hgetall(METRICS_KEY), {}))
    assert (
        found[
            key(
                "relay_webhooks_received_total",
                source="typeform",
                topic="form_response",
                outcome="queued",
                reason="",
            )
        ]
        == 1
    )
    away.close()


def test_a_long_outage_drops_minutes_the_series_no_longer_keeps():
    made = recorder()
    away = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    made.bind(away)
    now = time.time()
    made.tick("received", now - 3 * MINUTE_TTL_SECONDS)
    made.tick("received", now)
    assert not made.flush()
    assert list(made.take().minutes) == [("received", int(now // 60))]
    away.close()


def test_queue_gauges_read_depth_age_retries_and_failed(redis_client):
    queue = Queue("metrics-gauges", connection=redis_client)
    queue.empty()
    for registry in (queue.scheduled_job_registry, queue.failed_job_registry):
        redis_client.delete(registry.key)
    now = time.time()
    assert queue_gauges(redis_client, queue.name, now) == {
        "relay_queue_depth": 0,
        "relay_queue_oldest_age_seconds": 0.0,
        "relay_retries_scheduled": 0,
        "relay_deliveries_in_progress": 0,
        "relay_deliveries_failed": 0,
        "relay_workers": 0,
    }

    queue.enqueue("worker.jobs.deliver", {})
    queue.enqueue("worker.jobs.deliver", {})
    queue.enqueue_in(timedelta(hours=1), "worker.jobs.deliver")
    failed = Job.create("worker.jobs.deliver", connection=redis_client)
    failed.save()
    FailedJobRegistry(queue=queue).add(failed, ttl=600)

    gauges = queue_gauges(redis_client, queue.name, time.time() + 30)
    assert gauges["relay_queue_depth"] == 2
    assert 29 <= gauges["relay_queue_oldest_age_seconds"] < 60
    assert gauges["relay_retries_scheduled"] == 1
    assert gauges["relay_deliveries_failed"] == 1
    # Past the failed entry's expiry it no longer counts, cleaned up or not.
    assert (
        queue_gauges(redis_client, queue.name, now + 700)["relay_deliveries_failed"]
        == 0
    )
    queue.empty()


def test_only_workers_whose_key_lives_are_counted(redis_client):
    queue = Queue("metrics-workers", connection=redis_client)
    worker = Worker([queue], connection=redis_client)
    worker.register_birth()
    try:
        assert queue_gauges(redis_client, queue.name, time.time())["relay_workers"] == 1
        # A worker killed outright leaves its entry behind; its key expires.
        redis_client.delete(worker.key)
        assert queue_gauges(redis_client, queue.name, time.time())["relay_workers"] == 0
    finally:
        worker.register_death()


def test_bearer_token_is_required_exactly():
    token = "t" * 24
    assert authorized(f"Bearer {token}", token)
    assert authorized(f"bearer {token}", token)
    for header in (None, "", token, f"Basic {token}", f"Bearer {token}x", "Bearer "):
        assert not authorized(header, token)


def test_metrics_token_setting_is_checked_and_never_shown():
    assert load_settings({}).metrics_token is None
    good = load_settings({"RELAY_METRICS_TOKEN": " " + "a1" * 10 + " "})
    assert good.metrics_token == "a1" * 10
    assert good.describe()["metrics_token"] == "set"
    assert "a1a1" not in repr(good)

    for bad in ("short-token", "has a space in the middle ok", "ümlaut-token-long-x"):
        with pytest.raises(ConfigurationError) as raised:
            load_settings({"RELAY_METRICS_TOKEN": bad})
        assert "RELAY_METRICS_TOKEN" in str(raised.value)
        assert bad not in str(raised.value)
