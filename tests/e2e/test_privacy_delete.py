"""customers/redact with action: delete, and shop/redact erasing stored copies."""

from __future__ import annotations

import pytest
import redis

from tests.harness import (
    COPERNICA_TOKEN,
    fixture_bytes,
    shopify_headers,
    started_relay,
    wait_for_job,
    wait_for_log,
)
from tests.standin.copernica import CopernicaStandIn, Fault

pytestmark = pytest.mark.e2e

MAPPING = """
rules:
  - name: customers
    source: shopify
    topics: [customers/update]
    key: [email]
    create: true
    fields: {email: email(email), firstname: first_name, shopify_customer_id: id}
privacy:
  match:
    email: email(customer.email)
    shopify_customer_id: customer.id
  action: delete
"""


@pytest.fixture(scope="module")
def standin():
    with CopernicaStandIn(
        access_token=COPERNICA_TOKEN,
        databases={1234: ["email", "firstname", "shopify_customer_id"]},
        put_status=303,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def relay(redis_server, standin, tmp_path_factory):
    relay = started_relay(
        redis_server.url,
        standin.base_url,
        tmp_path_factory.mktemp("privacy-delete"),
        MAPPING,
        RELAY_QUEUE="privacy-delete",
    )
    yield relay
    relay.stop()


def send(relay, path, topic):
    body = fixture_bytes(path)
    response = relay.post("shopify", body, shopify_headers(body, topic))
    assert response.status_code == 202, response.text
    return response.json()["job"]


def test_redact_deletes_every_matching_profile_once(relay, standin, redis_server):
    by_email = standin.add_profile(1234, {"email": "zoe.angstrom+shop@example.com"})
    by_id = standin.add_profile(1234, {"shopify_customer_id": 8123456789012})
    other = standin.add_profile(1234, {"email": "keep@example.com"})

    send(relay, "shopify/customers_redact.json", "customers/redact")

    line = wait_for_log(relay, "customer redacted")
    assert (line["outcome"], line["action"], line["profiles"]) == (
        "applied",
        "delete",
        2,
    )
    deletes = [r.path for r in standin.requests if r.method == "DELETE"]
    assert sorted(deletes) == sorted(f"/v1/profile/{i}" for i in (by_email, by_id))
    assert [p["id"] for p in standin.profiles(1234)] == [other]


def test_shop_redact_erases_the_shops_stored_deliveries(relay, standin, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    standin.add_fault(Fault(method="PUT", status=400, message="Invalid data"))
    failed = wait_for_job(
        client, send(relay, "shopify/customers_update.json", "customers/update")
    )
    assert failed.get_status() == "failed"

    send(relay, "shopify/shop_redact.json", "shop/redact")

    assert wait_for_log(relay, "shop redacted")["local_copies_erased"] >= 1
    assert not client.exists(f"rq:job:{failed.id}")
