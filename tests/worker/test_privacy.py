"""Erasing the relay's own copies of a customer, against a real Redis."""

from __future__ import annotations

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from worker.privacy import erase_copies


@pytest.fixture
def queue(redis_client):
    queue = Queue("privacy-test", connection=redis_client, serializer=JSONSerializer)
    yield queue
    for key in redis_client.scan_iter("*privacy-test*"):
        redis_client.delete(key)


def store(queue, shop, body, source="shopify"):
    record = {"source": source, "account": shop, "body": body}
    return queue.enqueue("worker.retry.parse_retry_after", record).id


def test_only_the_named_customers_deliveries_of_that_shop_go(queue):
    zoe = store(queue, "a.myshopify.com", {"email": "zoe@example.com", "id": 81})
    spaced = store(queue, "a.myshopify.com", {"email": "  ZOË@exämple.se "})
    other = store(queue, "a.myshopify.com", {"email": "kim@example.com", "id": 810})
    other_shop = store(queue, "b.myshopify.com", {"email": "zoe@example.com"})

    erased = erase_copies(queue, "a.myshopify.com", ["zoe@example.com", "81"])
    erased += erase_copies(queue, "a.myshopify.com", ["zoë@exämple.se"])

    assert erased == 2
    assert set(queue.get_job_ids()) == {other, other_shop}
    assert zoe not in queue.get_job_ids() and spaced not in queue.get_job_ids()


@pytest.mark.parametrize(
    "shop, needles",
    [
        ("a.myshopify.com", []),  # a request that names nobody
        (None, ["zoe@example.com"]),  # no shop to keep it to
        (None, None),  # shop/redact without a shop
    ],
)
def test_a_request_that_names_nobody_erases_nothing(queue, shop, needles):
    kept = [
        store(queue, "a.myshopify.com", {"email": "zoe@example.com"}),
        store(queue, None, {"email": "zoe@example.com"}),
    ]

    assert erase_copies(queue, shop, needles) == 0
    assert queue.get_job_ids() == kept


def test_shop_redact_takes_every_delivery_of_that_shop_only(queue):
    store(queue, "a.myshopify.com", {"email": "zoe@example.com"})
    kept = store(queue, "b.myshopify.com", {"email": "zoe@example.com"})
    typeform = store(queue, "a.myshopify.com", {"x": 1}, source="typeform")

    assert erase_copies(queue, "a.myshopify.com", None) == 1
    assert queue.get_job_ids() == [kept, typeform]
