"""Event times, and the profile lock and order marks against a real Redis."""

from __future__ import annotations

import pytest

from worker.profiles import ProfileGuard, event_time, parse_time, selector_digest


def test_shopify_event_time_prefers_updated_at_over_the_trigger_time():
    body = {"updated_at": "2026-08-14T10:21:03+02:00"}
    assert event_time(body, "2026-08-14T09:00:00Z", "shopify") == parse_time(
        "2026-08-14T08:21:03Z"
    )
    assert event_time({}, "2026-08-14T08:24:42.118309517Z", "shopify") == (
        parse_time("2026-08-14T08:24:42.118309Z")
    )
    assert event_time({"updated_at": "garbage"}, None, "shopify") is None


def test_typeform_event_time_is_submitted_at():
    assert event_time(
        {"updated_at": "2030-01-01T00:00:00Z"}, "2026-08-14T08:06:47Z", "typeform"
    ) == parse_time("2026-08-14T08:06:47+00:00")


def test_selector_digest_ignores_field_name_case_only():
    a = selector_digest("1", (("email", "A@x.se"),))
    assert a == selector_digest("1", (("EMAIL", "A@x.se"),))
    assert a != selector_digest("1", (("email", "a@x.se"),))
    assert a != selector_digest("2", (("email", "A@x.se"),))


@pytest.fixture
def guard(redis_client):
    def make():
        return ProfileGuard(
            redis_client,
            "1",
            (("email", "g@example.com"),),
            lock_seconds=5,
            mark_ttl_seconds=60,
        )

    yield make
    for key in redis_client.scan_iter("relay:*"):
        redis_client.delete(key)


def raise_mark(guard, rule: str, moment: float, delivery: str = "") -> float:
    """Apply ``rule`` at ``moment`` as a delivery does; the mark in force after."""
    writer = guard()
    assert writer.hold([rule]) == []
    writer.applied(rule, moment, delivery)
    writer.finish(release=True)
    return guard().mark(rule)


def test_one_holder_at_a_time_and_only_the_holder_releases(guard):
    first, second = guard(), guard()
    assert first.acquire()
    assert not second.acquire()
    second.release()  # not the holder: nothing happens
    assert not second.acquire()
    first.release()
    assert second.acquire()


def test_marks_only_move_forward_and_are_kept_per_rule(guard, redis_client):
    g = guard()
    assert g.mark("rule-a") is None
    assert raise_mark(guard, "rule-a", 200.5) == 200.5
    assert raise_mark(guard, "rule-a", 100.0) == 200.5
    assert g.mark("rule-a") == 200.5
    assert g.mark("rule-b") is None
    assert 0 < redis_client.ttl(g._mark_key("rule-a")) <= 60


def test_a_mark_remembers_the_delivery_that_brought_its_time(guard):
    g = guard()
    raise_mark(guard, "rule-a", 200.0, "shopify\nd-1")
    assert g.marked_by("rule-a", "shopify\nd-1")
    assert not g.marked_by("rule-a", "shopify\nd-2")

    # Another event of the same second takes the mark over; an older one not.
    assert raise_mark(guard, "rule-a", 200.0, "shopify\nd-2") == 200.0
    assert g.marked_by("rule-a", "shopify\nd-2")
    assert raise_mark(guard, "rule-a", 100.0, "shopify\nd-3") == 200.0
    assert g.marked_by("rule-a", "shopify\nd-2")
    assert not g.marked_by("rule-b", "shopify\nd-2")


def test_hold_takes_the_lock_and_reads_marks_and_other_keys_in_one_step(
    guard, redis_client
):
    first, second = guard(), guard()
    raise_mark(guard, "rule-a", 300.0)
    redis_client.set("relay:test:schema", b"cached")

    assert first.hold(["rule-a", "rule-b"], read=("relay:test:schema",)) == [b"cached"]
    assert first.mark("rule-a") == 300.0
    assert first.mark("rule-b") is None
    # Busy: nothing is read, and the holder keeps the lock.
    assert second.hold(["rule-a"], read=("relay:test:schema",)) is None
    assert not second.acquire()


def test_finish_raises_applied_marks_and_releases_only_when_asked(guard, redis_client):
    first, second, third = guard(), guard(), guard()
    assert first.hold(["rule-a", "rule-b"]) == []
    first.applied("rule-a", 500.0)
    first.applied("rule-b", 50.0)
    assert first.pending() == ["rule-a", "rule-b"]
    first.finish(release=False)  # a write in doubt: the lock stays

    assert second.hold(["rule-a", "rule-b"]) is None
    assert second.mark("rule-a") == 500.0
    assert second.mark("rule-b") == 50.0
    assert first.pending() == []

    redis_client.delete(first.lock_key)
    assert second.hold(["rule-b"]) == []
    second.applied("rule-b", 20.0)  # older: the mark does not go back
    second.finish(release=True)
    assert third.mark("rule-b") == 50.0
    assert 0 < redis_client.ttl(third._mark_key("rule-b")) <= 60
    assert third.acquire()


def test_finish_names_the_delivery_that_hold_reads_back(guard):
    first, second = guard(), guard()
    assert first.hold(["rule-a"]) == []
    first.applied("rule-a", 700.0, "shopify\nd-7")
    first.finish(release=True)

    # The next holder learns who set the mark without another round trip,
    # so the same delivery sent again is known as a replay.
    assert second.hold(["rule-a"]) == []
    assert second.mark("rule-a") == 700.0
    assert second.marked_by("rule-a", "shopify\nd-7")
    assert not second.marked_by("rule-a", "shopify\nd-8")
    second.finish(release=True)
