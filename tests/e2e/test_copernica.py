"""Copernica done right: checked fields, v4 tokens, orders, privacy, shared limits.

Runs the bundled mapping against API v4 (the v1 path is covered the same way
by test_relay.py, which runs for both versions) with the stand-in serving
the database's fields and an "orders" collection.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from tests.harness import (
    COPERNICA_TOKEN,
    DATABASE_FIELDS,
    ORDER_FIELDS,
    ROOT,
    Process,
    Relay,
    fixture_bytes,
    relay_env,
    shopify_headers,
    wait_for_job,
    wait_for_log,
    writes,
)
from tests.standin.copernica import CopernicaStandIn, Fault

pytestmark = pytest.mark.e2e

ZOE = "zoe.angstrom+shop@example.com"


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
def relay(redis_server, standin, tmp_path_factory):
    relay = Relay(
        env=relay_env(
            redis_server.url,
            standin.base_url,
            COPERNICA_API_VERSION="4",
            COPERNICA_AUTH_URL=f"{standin.base_url}/authenticate",
            RELAY_QUEUE="copernica",
        ),
        log_dir=tmp_path_factory.mktemp("copernica-logs"),
    )
    relay.start_web()
    relay.start_worker()
    yield relay
    relay.stop()


@pytest.fixture
def client(redis_server):
    connection = redis.Redis.from_url(redis_server.url)
    yield connection
    connection.close()


def send(relay, path_or_body, topic, delivery_id=None):
    body = (
        fixture_bytes(path_or_body) if isinstance(path_or_body, str) else path_or_body
    )
    response = relay.post("shopify", body, shopify_headers(body, topic, delivery_id))
    assert response.status_code == 202, response.text
    return response.json()["job"]


def puts(standin, fragment=""):
    return [r for r in writes(standin) if fragment in r.path]


def test_a_field_the_database_lacks_is_never_sent_and_replay_works_once_added(
    relay, standin, client
):
    standin._database_fields[1234].remove("phone")  # as if nobody created it
    try:
        job = wait_for_job(
            client, send(relay, "shopify/customers_update.json", "customers/update")
        )
    finally:
        standin._database_fields[1234].append("phone")

    assert job.get_status() == "failed"
    assert job.meta["reason"] == (
        "shopify-customer: field 'phone' is not a field of database 1234 "
        "(fix the mapping or the database, then requeue)"
    )
    assert writes(standin) == []
    assert standin.ignored_filters == []

    requeued = subprocess.run(
        [sys.executable, "-m", "app", "failed", "requeue", job.id],
        cwd=ROOT,
        env=relay.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert requeued.returncode == 0, requeued.stderr
    assert wait_for_job(client, job.id).get_status() == "finished"
    [put] = writes(standin)
    assert put.json["fields"]["phone"] == "+46701740605"


def test_v4_token_is_exchanged_once_shared_and_renewed_at_once_when_refused(
    relay, standin, client
):
    issued = standin.tokens_issued
    first = wait_for_job(
        client, send(relay, b'{"id":1,"email":"a@example.com"}', "customers/create")
    )
    second = wait_for_job(
        client, send(relay, b'{"id":2,"email":"b@example.com"}', "customers/create")
    )
    assert standin.tokens_issued == issued + 1

    standin.expire_tokens()
    third = wait_for_job(
        client, send(relay, b'{"id":3,"email":"c@example.com"}', "customers/create")
    )

    assert [job.get_status() for job in (first, second, third)] == ["finished"] * 3
    assert standin.tokens_issued == issued + 2
    # Renewed and resent within the same run: no retry was scheduled.
    assert third.meta.get("failures", 0) == 0
    assert [r.status for r in puts(standin)] == [201, 201, 401, 201]
    for put in puts(standin):
        assert "access_token" not in put.raw_query
        assert put.headers["authorization"].startswith("Bearer ")


def test_order_for_an_existing_profile_finds_it_and_paid_updates_the_same_order(
    relay, standin, client
):
    profile_id = standin.add_profile(1234, {"email": ZOE, "firstname": "Zoë"})
    order = json.loads(fixture_bytes("shopify/orders_create.json"))
    created = json.dumps(order).encode()
    order["financial_status"] = "paid"
    order["updated_at"] = "2026-08-14T10:30:00+02:00"
    paid = json.dumps(order).encode()
    order["financial_status"] = "pending"

    for body, topic in ((created, "orders/create"), (paid, "orders/paid")):
        assert wait_for_job(client, send(relay, body, topic)).get_status() == (
            "finished"
        )

    lookups = [
        r
        for r in standin.requests
        if r.method == "GET" and r.path.endswith("/profiles")
    ]
    assert lookups and lookups[0].query_values("fields[]") == [f"email=={ZOE}"]
    [subprofile] = standin.subprofiles(profile_id, "orders")
    assert subprofile["fields"]["order_id"] in (6543210987654, "6543210987654")
    assert len(standin.profiles(1234)) == 1


def test_customer_redact_clears_the_matching_profiles_and_the_relays_copies(
    relay, standin, client
):
    by_email = standin.add_profile(
        1234, {"email": ZOE, "firstname": "Zoë", "phone": "+46701740605"}
    )
    by_id = standin.add_profile(
        1234, {"email": "other@example.com", "shopify_customer_id": 8123456789012}
    )
    untouched = standin.add_profile(
        1234, {"email": "keep@example.com", "firstname": "Keep"}
    )
    standin.add_fault(Fault(method="PUT", status=400, message="Invalid data"))
    failed = wait_for_job(
        client, send(relay, "shopify/customers_update.json", "customers/update")
    )
    assert failed.get_status() == "failed"

    job_id = send(relay, "shopify/customers_redact.json", "customers/redact")

    line = wait_for_log(relay, "customer redacted")
    assert wait_for_job(client, job_id) is None  # not kept once done
    assert line["outcome"] == "applied" and line["profiles"] == 2
    # The failed delivery, and finished ones of earlier tests still in Redis.
    assert line["local_copies_erased"] >= 1
    assert not client.exists(f"rq:job:{failed.id}")
    profiles = {p["id"]: p["fields"] for p in standin.profiles(1234)}
    for profile_id in (by_email, by_id):
        assert profiles[profile_id]["email"] == ""
        assert profiles[profile_id]["firstname"] == ""
        assert profiles[profile_id]["phone"] == ""
    assert profiles[untouched]["firstname"] == "Keep"
    assert ZOE not in relay.logs() and "8123456789012" not in relay.logs()


@pytest.mark.parametrize(
    "email, outcome",
    [
        ("a=b<c>d!e~f%g_h@example.com", "applied"),
        ("=starts@example.com", "skipped"),
        ("~starts@example.com", "skipped"),
    ],
)
def test_operator_characters_in_selector_values(relay, standin, client, email, outcome):
    lookalike = standin.add_profile(1234, {"email": email.replace("_", "x")})
    body = json.dumps({"id": 9, "email": email, "first_name": "Op"}).encode()

    job = wait_for_job(client, send(relay, body, "customers/update"))

    assert job.return_value()["outcome"] == outcome
    if outcome == "applied":
        [put] = writes(standin)
        assert put.query_values("fields[]") == [f"email=={email}"]
        # "_" is no wildcard with ==: the look-alike profile is left alone.
        profiles = {p["id"]: p["fields"] for p in standin.profiles(1234)}
        assert profiles[lookalike]["firstname"] == ""
        assert [f["email"] for f in profiles.values()].count(email) == 1
    else:
        assert writes(standin) == []
    assert standin.ignored_filters == []


def test_check_command_reports_missing_fields_and_exits_non_zero(relay, standin):
    def check():
        return subprocess.run(
            [sys.executable, "-m", "app", "check"],
            cwd=ROOT,
            env=relay.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    good = check()
    assert good.returncode == 0, good.stdout + good.stderr
    assert "mapping matches Copernica" in good.stdout

    standin._database_fields[1234].remove("last_order_total")
    try:
        bad = check()
    finally:
        standin._database_fields[1234].append("last_order_total")
    assert bad.returncode == 1
    assert (
        "database 1234: shopify-order: field 'last_order_total' is not a "
        "field of the database"
    ) in bad.stdout


@pytest.fixture
def only_these_workers(relay):
    """Stop the module's worker while a test runs workers of its own."""
    for worker in relay.workers:
        worker.stop()
    relay.workers.clear()
    yield
    relay.start_worker()


def test_calls_share_a_rate_limit_across_workers(
    relay, standin, client, tmp_path, only_these_workers
):
    workers = [
        Process(
            f"limited-{n}",
            [sys.executable, "-m", "worker"],
            {**relay.env, "COPERNICA_MAX_RPS": "4", "COPERNICA_MAX_CONCURRENCY": "1"},
            tmp_path / f"limited-{n}.log",
        )
        for n in range(2)
    ]
    for worker in workers:
        worker.start()
    try:
        standin.add_fault(Fault(method="PUT", status=None, delay=0.2, times=12))
        jobs = [
            send(
                relay,
                json.dumps({"id": n, "email": f"rate{n}@example.com"}).encode(),
                "customers/create",
            )
            for n in range(12)
        ]
        for job_id in jobs:
            assert wait_for_job(client, job_id, timeout=30).get_status() == "finished"
    finally:
        for worker in workers:
            worker.stop()

    arrivals = sorted(r.received_at for r in puts(standin))
    assert len(arrivals) == 12
    assert standin.peak_concurrency == 1
    # 12 calls at 4 per second with a bucket of 4: at least 2 s apart end to end.
    assert arrivals[-1] - arrivals[0] >= 1.9


def test_overload_halves_the_shared_rate_and_every_event_still_lands(
    relay, standin, client, tmp_path, only_these_workers
):
    worker = Process(
        "overloaded",
        [sys.executable, "-m", "worker"],
        {
            **relay.env,
            "COPERNICA_MAX_RPS": "10",
            "RELAY_RETRY_SCHEDULE": "1,1,1,1,1,1,1,1",
        },
        tmp_path / "overloaded.log",
    )
    worker.start()
    try:
        standin.add_fault(Fault(method="PUT", status=503, times=3))
        jobs = [
            send(
                relay,
                json.dumps({"id": n, "email": f"load{n}@example.com"}).encode(),
                "customers/create",
            )
            for n in range(6)
        ]
        for job_id in jobs:
            assert wait_for_job(client, job_id, timeout=40).get_status() == "finished"
        rate = client.get("relay:limit:rate")
    finally:
        worker.stop()

    assert rate is not None and float(rate) < 10
    assert (
        len({r.query_values("fields[]")[0] for r in puts(standin) if r.status == 201})
        == 6
    )
    assert "relay:limit:rate" and "delivery will be retried" in worker.output()
