"""Choosing failed deliveries, and what a listing may show."""

from __future__ import annotations

from datetime import UTC, datetime

from app.failed import FailedDelivery, select
from app.logs import mask_text


def item(job, source="shopify", topic="customers/update", hour=10, delivery=None):
    return FailedDelivery(
        job_id=job,
        delivery_id=delivery or f"d-{job}",
        source=source,
        topic=topic,
        account=None,
        reason="r",
        failed_at=datetime(2026, 12, 4, hour, tzinfo=UTC),
        attempts=1,
        job=None,
    )


ITEMS = [item("a"), item("b", "typeform", "form_response", 12), item("c", hour=14)]


def test_filters_combine():
    assert [i.job_id for i in select(ITEMS, source="shopify")] == ["a", "c"]
    assert [i.job_id for i in select(ITEMS, topic="form_response")] == ["b"]
    since = datetime(2026, 12, 4, 11, tzinfo=UTC)
    until = datetime(2026, 12, 4, 13, tzinfo=UTC)
    assert [i.job_id for i in select(ITEMS, since=since, until=until)] == ["b"]
    assert [i.job_id for i in select(ITEMS, source="shopify", since=since)] == ["c"]


def test_ids_may_be_job_or_delivery_ids():
    assert [i.job_id for i in select(ITEMS, ids=["d-b", "c"])] == ["b", "c"]


def test_emails_in_reasons_are_masked():
    text = "rule: Copernica answered 400: email jose.nunez+vip@example.com invalid"
    assert (
        mask_text(text)
        == "rule: Copernica answered 400: email j***@example.com invalid"
    )


def test_operators_before_an_address_are_kept():
    assert mask_text("Invalid selector email==zoe+shop@example.com") == (
        "Invalid selector email==z***@example.com"
    )
