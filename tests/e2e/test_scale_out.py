"""Two web instances and three workers on one Redis deliver each event once.

Two gunicorn servers (different ports, as two dynos or containers would be)
and three ``python -m worker`` processes share one Redis; the Copernica
stand-in records every call. A few hundred signed events arrive at both
servers at once, some deliveries are sent to both servers at the same moment
and sent again later, and some Copernica calls fail and are retried.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from rq import Queue
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from tests.harness import (
    COPERNICA_TOKEN,
    DATABASE_FIELDS,
    Relay,
    relay_env,
    shopify_headers,
    writes,
)
from tests.standin.copernica import CopernicaStandIn, Fault
from tools.embedded_redis import RedisServer

pytestmark = pytest.mark.e2e

UNIQUE_EVENTS = 240
#: Deliveries sent to both servers at the same moment, then once more.
DOUBLED_EVENTS = 30
SENDERS = 16


@pytest.fixture
def shared_redis(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def standin():
    with CopernicaStandIn(
        access_token=COPERNICA_TOKEN, databases={1234: DATABASE_FIELDS}
    ) as server:
        yield server


@pytest.fixture
def instances(shared_redis, standin, tmp_path):
    env = relay_env(
        shared_redis.url,
        standin.base_url,
        # The stand-in answers at once; the shared call limits are tested
        # elsewhere and would only slow this test down.
        COPERNICA_MAX_RPS="0",
        COPERNICA_MAX_CONCURRENCY="0",
        WEB_CONCURRENCY="1",
    )
    first, second = (Relay(env=env, log_dir=tmp_path / n) for n in ("a", "b"))
    try:
        for relay in (first, second):
            relay.log_dir.mkdir()
            relay.start_web()
        for _ in range(3):
            first.start_worker()
        yield first, second
    finally:
        first.stop()
        second.stop()


def event(number: int) -> tuple[bytes, str]:
    body = json.dumps(
        {"id": number, "email": f"scale{number}@example.com", "first_name": "Sc"}
    ).encode()
    return body, f"scale-out-{number}"


def post(relay: Relay, number: int) -> tuple[int, int, str]:
    body, delivery = event(number)
    headers = shopify_headers(body, "customers/create", delivery_id=delivery)
    response = relay.post("shopify", body, headers, timeout=20)
    return number, response.status_code, response.json().get("status", "")


def test_every_event_is_applied_once_by_many_processes(instances, standin, tmp_path):
    first, second = instances
    client = redis.Redis.from_url(first.env["REDIS_URL"])
    # A few calls fail with 503 and come back through the retry schedule.
    standin.add_fault(Fault(method="PUT", status=503, times=8))
    doubled = range(UNIQUE_EVENTS, UNIQUE_EVENTS + DOUBLED_EVENTS)
    barriers = {n: threading.Barrier(2) for n in doubled}

    def at_once(relay, number):
        barriers[number].wait(timeout=20)
        return post(relay, number)

    started = time.monotonic()
    with ThreadPoolExecutor(SENDERS) as pool:
        calls = [
            pool.submit(post, (first, second)[n % 2], n) for n in range(UNIQUE_EVENTS)
        ]
        for number in doubled:
            calls += [pool.submit(at_once, relay, number) for relay in instances]
        answers = [call.result() for call in calls]
        # The sender's retry, after both copies were answered.
        answers += list(pool.map(lambda n: post(second, n), doubled))
    sent_in = time.monotonic() - started

    expected = [
        f"email==scale{n}@example.com" for n in range(UNIQUE_EVENTS + DOUBLED_EVENTS)
    ]
    wait_until_applied(standin, len(expected), timeout=40)
    time.sleep(1.0)  # time for a second copy of any of them to arrive
    applied = [r.query_values("fields[]")[0] for r in applied_writes(standin)]

    by_number = {}
    for number, status, outcome in answers:
        by_number.setdefault(number, []).append((status, outcome))
    assert all(by_number[n] == [(202, "queued")] for n in range(UNIQUE_EVENTS))
    for number in doubled:
        assert sorted(by_number[number]) == [
            (200, "duplicate"),
            (200, "duplicate"),
            (202, "queued"),
        ], number
    assert Counter(applied) == Counter(expected)
    assert sum(1 for r in writes(standin) if r.status == 503) == 8

    queue = Queue("deliveries", connection=client)
    assert queue.count == 0
    for registry in (StartedJobRegistry, ScheduledJobRegistry, FailedJobRegistry):
        assert registry(queue=queue).count == 0, registry.__name__
    assert all(w.process.poll() is None for w in first.workers)
    print(f"scale-out: {len(answers)} requests sent in {sent_in:.1f} s")


def applied_writes(standin) -> list:
    # 303 is the stand-in's answer to a PUT it applied.
    return [r for r in writes(standin) if r.status == 303]


def wait_until_applied(standin, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(applied_writes(standin)) < count:
        if time.monotonic() > deadline:
            found = len(applied_writes(standin))
            raise AssertionError(f"{found} of {count} events applied in {timeout} s")
        time.sleep(0.2)
