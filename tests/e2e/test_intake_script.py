"""A job stored by the intake script is taken and delivered by a real worker."""

from __future__ import annotations

import json

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from app import intake
from app.deliveries import Delivery
from tests.harness import fixture_bytes, wait_for_job, wait_for_writes

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api_version():
    # The API version is what the other modules vary; one is enough here.
    return 1


def test_a_stored_job_reaches_copernica(relay, standin, redis_server):
    body = json.loads(fixture_bytes("shopify/customers_create.json"))
    body["email"] = "stored.by.script@example.com"
    delivery = Delivery(
        source="shopify",
        topic="customers/create",
        delivery_id="script-e2e",
        account="nordlys-goods-test.myshopify.com",
        received_at="2026-12-04T18:00:00.000000+00:00",
        event_at=None,
        event_id=None,
        body=body,
    )
    connection = redis.Redis.from_url(redis_server.url)
    queue = Queue("deliveries-v1", connection=connection, serializer=JSONSerializer)

    stored = intake.store(
        queue,
        delivery,
        dedupe_ttl=60,
        result_ttl=60,
        failure_ttl=60,
        job_timeout=28,
    )

    job = wait_for_job(connection, stored.job_id)
    assert job.get_status() == "finished", job.latest_result()
    [put] = wait_for_writes(standin, 1)
    assert put.json["email"] == "stored.by.script@example.com"
