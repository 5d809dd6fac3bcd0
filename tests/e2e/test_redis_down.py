"""Redis gone: the relay says 503 so senders retry, and stores nothing half."""

from __future__ import annotations

import pytest
import requests

from app.intake import dedupe_key
from tests.harness import Relay, relay_env, shopify_headers, typeform_headers
from tests.leaks import dump_jobs
from tools.embedded_redis import RedisServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-down"), unix_socket=False)
    server.start()
    yield server
    if server.process is None:
        server.start()  # a test left it stopped; its jobs are still on disk
    dump_jobs(server.url, server.directory)
    server.stop()


@pytest.fixture(scope="module")
def relay(own_redis, tmp_path_factory):
    # No Typeform secret: that source must refuse everything with 503.
    relay = Relay(
        env=relay_env(own_redis.url, None, TYPEFORM_WEBHOOK_SECRET=""),
        log_dir=tmp_path_factory.mktemp("relay-down-logs"),
    )
    relay.start_web()
    yield relay
    relay.stop()


def test_redis_stopped_gives_503_on_webhook_and_readyz(relay, own_redis):
    body = b'{"id":1,"email":"down@example.com"}'
    headers = shopify_headers(body, "customers/create", delivery_id="while-down")
    own_redis.stop()
    try:
        response = relay.post("shopify", body, headers)
        ready = requests.get(f"{relay.url}/readyz", timeout=10)
    finally:
        own_redis.start()

    assert response.status_code == 503
    assert response.json()["error"] == "event could not be stored, retry later"
    assert ready.status_code == 503
    assert requests.get(f"{relay.url}/healthz", timeout=5).status_code == 200

    # The sender's retry after Redis came back is accepted, not a duplicate.
    retry = relay.post("shopify", body, headers)
    assert retry.status_code == 202, retry.text


def test_source_without_secret_answers_503_and_says_so_at_start(relay):
    body = b'{"event_type":"form_response"}'

    response = relay.post("typeform", body, typeform_headers(body))

    assert response.status_code == 503
    assert "no typeform secret configured" in response.json()["error"]
    assert "TYPEFORM_WEBHOOK_SECRET" in relay.web.output()


def test_failed_store_releases_the_dedupe_key_so_the_retry_is_taken(relay, own_redis):
    import redis as redis_py

    client = redis_py.Redis.from_url(own_redis.url)
    body = b'{"id":2,"email":"half@example.com"}'
    headers = shopify_headers(body, "customers/create", delivery_id="half-stored")
    # A queue key of the wrong type makes the push fail inside the transaction
    # after the dedupe key was set: Redis does not roll that back.
    client.delete("rq:queue:deliveries")
    client.set("rq:queue:deliveries", "not a list")
    try:
        response = relay.post("shopify", body, headers)
        assert response.status_code == 503
        assert not client.exists(dedupe_key("shopify", "half-stored"))
    finally:
        client.delete("rq:queue:deliveries")

    retry = relay.post("shopify", body, headers)
    assert retry.status_code == 202, retry.text
    assert client.lrange("rq:queue:deliveries", 0, -1)[-1] == (
        retry.json()["job"].encode()
    )
