"""Faults on the way to Copernica, and what each one leaves behind.

Each test states the events it sends, then checks the exact requests the
stand-in received and the profiles it ends with: nothing lost, nothing
applied twice, the newest data wins. The module has its own Redis (it is
restarted here) and starts and kills worker processes per test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from app.intake import DEDUPE_PREFIX
from tests.harness import (
    COPERNICA_TOKEN,
    DATABASE_FIELDS,
    ROOT,
    Relay,
    relay_env,
    shopify_headers,
    wait_for_job,
    writes,
)
from tests.leaks import dump_jobs
from tests.standin.copernica import CopernicaStandIn, Fault
from tools.embedded_redis import RedisServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("faults-redis"), unix_socket=False)
    server.start()
    yield server
    if server.process is None:
        server.start()  # a test left it stopped; its jobs are still on disk
    dump_jobs(server.url, server.directory)
    server.stop()


@pytest.fixture(scope="module")
def standin():
    # The upsert window makes concurrent create=1 PUTs race, as they may on
    # the real API; only the relay's per-profile lock prevents duplicates.
    with CopernicaStandIn(
        access_token=COPERNICA_TOKEN,
        databases={1234: DATABASE_FIELDS},
        put_status=303,
        upsert_window=0.3,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def relay(own_redis, standin, tmp_path_factory):
    relay = Relay(
        env=relay_env(
            own_redis.url,
            standin.base_url,
            RELAY_RETRY_SCHEDULE="1,1,1,5",
            COPERNICA_CONNECT_TIMEOUT="1",
            COPERNICA_READ_TIMEOUT="2",
            RELAY_JOB_TIMEOUT="6",
            RELAY_RECOVERY_INTERVAL="1",
        ),
        log_dir=tmp_path_factory.mktemp("faults-logs"),
    )
    relay.start_web()
    yield relay
    relay.stop()


@pytest.fixture
def workers(relay):
    """Start worker processes on demand; all are stopped after the test."""
    started = []

    def start(count=1):
        for _ in range(count):
            started.append(relay.start_worker())
        return started[-count:]

    yield start
    for worker in started:
        worker.stop()
    relay.workers.clear()


@pytest.fixture
def client(own_redis):
    connection = redis.Redis.from_url(own_redis.url)
    yield connection
    connection.close()


def customer(email, updated_at, firstname, number=1):
    return json.dumps(
        {
            "id": number,
            "email": email,
            "first_name": firstname,
            "updated_at": updated_at,
        }
    ).encode()


def send(relay, body, topic="customers/update", delivery_id=None):
    response = relay.post("shopify", body, shopify_headers(body, topic, delivery_id))
    assert response.status_code == 202, response.text
    return response.json()["job"]


def profiles_with(standin, email):
    return [p for p in standin.profiles(1234) if p["fields"]["email"] == email]


def wait_for_arrivals(standin, count, timeout=10.0):
    """Wait until requests have arrived, answered or not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(writes(standin)) >= count:
            return writes(standin)
        time.sleep(0.05)
    raise AssertionError(f"{len(writes(standin))} requests arrived, not {count}")


def test_429_with_retry_after_is_retried_no_sooner(relay, standin, client, workers):
    workers()
    standin.add_fault(Fault(method="PUT", status=429, headers={"Retry-After": "2"}))

    job = wait_for_job(client, send(relay, customer("r429@example.com", None, "A")))

    assert job.get_status() == "finished"
    first, second = writes(standin)
    assert (first.status, second.status) == (429, 303)
    assert 2.0 <= second.received_at - first.received_at < 4.5


def test_huge_retry_after_is_capped_at_the_longest_delay(
    relay, standin, client, workers
):
    workers()
    standin.add_fault(Fault(method="PUT", status=429, headers={"Retry-After": "86400"}))

    job = wait_for_job(
        client, send(relay, customer("huge@example.com", None, "A")), timeout=20
    )

    assert job.get_status() == "finished"
    first, second = writes(standin)
    # The schedule here is 1,1,1,5: a day-long Retry-After waits 5 s (plus
    # the slack second for RQ's whole-second scheduling).
    assert 5.0 <= second.received_at - first.received_at < 8.5


def test_connection_that_never_answers_times_out_and_is_retried(
    relay, standin, client, workers
):
    workers()
    standin.add_fault(Fault(method="PUT", hang=True))

    job = wait_for_job(client, send(relay, customer("hang@example.com", None, "H")))

    assert job.get_status() == "finished"
    assert [r.status for r in writes(standin)] == [None, 303]
    assert len(profiles_with(standin, "hang@example.com")) == 1


def test_retries_run_out_into_the_failed_list_with_the_reason(
    relay, standin, client, workers
):
    workers()
    standin.add_fault(Fault(method="PUT", status=503, times=5))

    job = wait_for_job(
        client, send(relay, customer("down@example.com", None, "D")), timeout=30
    )

    assert job.get_status() == "failed"
    assert [r.status for r in writes(standin)] == [503] * 5
    assert job.meta["reason"].startswith(
        "shopify-customer: gave up after 5 attempts; last: Copernica answered 503"
    )
    assert profiles_with(standin, "down@example.com") == []


def test_worker_killed_mid_request_leaves_the_delivery_to_another(
    relay, standin, client, workers
):
    [doomed] = workers()
    standin.add_fault(Fault(method="PUT", hang=True))
    job_id = send(relay, customer("killed@example.com", None, "K"))
    wait_for_arrivals(standin, 1)

    doomed.stop(signal.SIGKILL)
    workers()  # the survivor finds the abandoned delivery and runs it again
    job = wait_for_job(client, job_id, timeout=30)

    assert job.get_status() == "finished", relay.logs()[-3000:]
    assert job.meta["abandoned"] == 1
    assert [r.status for r in writes(standin)] == [None, 303]
    assert len(profiles_with(standin, "killed@example.com")) == 1


def test_sigterm_lets_the_worker_finish_the_delivery_in_hand(
    relay, standin, client, workers
):
    [worker] = workers()
    standin.add_fault(
        Fault(method="PUT", status=None, delay=1.2)
    )  # under the 2 s read timeout
    job_id = send(relay, customer("term@example.com", None, "T"))
    wait_for_arrivals(standin, 1)

    worker.process.send_signal(signal.SIGTERM)
    code = worker.process.wait(15)
    job = wait_for_job(client, job_id, timeout=5)

    assert code == 0
    assert job.get_status() == "finished"
    assert [r.status for r in writes(standin)] == [303]


def test_events_waiting_in_redis_survive_a_redis_restart(
    relay, standin, client, workers, own_redis
):
    emails = [f"restart{n}@example.com" for n in range(3)]
    jobs = [
        send(relay, customer(email, None, "R", number=n))
        for n, email in enumerate(emails)
    ]
    time.sleep(1.5)  # appendfsync everysec

    own_redis.stop()
    own_redis.start()
    workers()

    for job_id in jobs:
        assert wait_for_job(client, job_id).get_status() == "finished"
    assert sorted(r.query_values("fields[]")[0] for r in writes(standin)) == [
        f"email=={email}" for email in emails
    ]
    for email in emails:
        assert len(profiles_with(standin, email)) == 1


def test_events_for_one_customer_sent_newest_first_keep_the_newest(
    relay, standin, client, workers
):
    workers()
    newer = customer("order@example.com", "2026-08-14T10:21:03+02:00", "Newer")
    older = customer("order@example.com", "2026-08-14T10:15:27+02:00", "Older")

    first = wait_for_job(client, send(relay, newer, "customers/update"))
    second = wait_for_job(client, send(relay, older, "customers/create"))

    assert first.return_value()["outcome"] == "applied"
    assert second.return_value()["outcome"] == "skipped"
    assert "older than the newest event" in second.return_value()["calls"][0]["reason"]
    assert len(writes(standin)) == 1
    [profile] = profiles_with(standin, "order@example.com")
    assert profile["fields"]["firstname"] == "Newer"


def test_two_events_for_a_new_email_on_two_workers_make_one_profile(
    relay, standin, client, workers
):
    workers(2)
    time.sleep(1.0)  # both workers listening
    bodies = [
        customer("race@example.com", "2026-08-14T10:00:00+00:00", "First"),
        customer("race@example.com", "2026-08-14T10:00:05+00:00", "Second"),
    ]
    job_ids = []
    threads = [
        threading.Thread(target=lambda b=b: job_ids.append(send(relay, b)))
        for b in bodies
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for job_id in job_ids:
        wait_for_job(client, job_id, timeout=20)

    [profile] = profiles_with(standin, "race@example.com")
    assert profile["fields"]["firstname"] == "Second"
    assert "profile busy" in relay.logs() or len(writes(standin)) == 1


def test_replay_after_the_dedupe_window_does_not_undo_a_newer_change(
    relay, standin, client, workers
):
    workers()
    old = customer("replay@example.com", "2026-08-14T10:00:00+00:00", "Old")
    new = customer("replay@example.com", "2026-08-14T11:00:00+00:00", "New")
    wait_for_job(client, send(relay, old, delivery_id="replayed-delivery"))
    wait_for_job(client, send(relay, new))

    for key in client.scan_iter(f"{DEDUPE_PREFIX}*"):
        client.delete(key)  # as if 72 hours had passed
    replay = wait_for_job(client, send(relay, old, delivery_id="replayed-delivery"))

    assert replay.return_value()["outcome"] == "skipped"
    assert len(writes(standin)) == 2
    [profile] = profiles_with(standin, "replay@example.com")
    assert profile["fields"]["firstname"] == "New"


def test_replay_of_the_newest_delivery_after_the_dedupe_window_is_not_applied_again(
    relay, standin, client, workers
):
    # The captured delivery is the newest for its profile, so no newer mark
    # stands in its way: the mark's own delivery is what catches it.
    workers()
    body = customer("captured@example.com", "2026-08-14T10:00:00+00:00", "Once")
    same_second = customer("captured@example.com", "2026-08-14T10:00:00+00:00", "Too")
    first = wait_for_job(client, send(relay, body, delivery_id="captured-delivery"))

    for key in client.scan_iter(f"{DEDUPE_PREFIX}*"):
        client.delete(key)  # as if 72 hours had passed
    replay = wait_for_job(client, send(relay, body, delivery_id="captured-delivery"))
    # Another delivery of the same second is still applied.
    other = wait_for_job(client, send(relay, same_second))

    assert first.return_value()["outcome"] == "applied"
    assert replay.return_value()["outcome"] == "skipped"
    assert "a replay" in replay.return_value()["calls"][0]["reason"]
    assert other.return_value()["outcome"] == "applied"
    assert len(writes(standin)) == 2
    [profile] = profiles_with(standin, "captured@example.com")
    assert profile["fields"]["firstname"] == "Too"


def relay_cli(relay, *args):
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env=relay.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_failed_delivery_is_listed_masked_requeued_and_delivered(
    relay, standin, client, workers
):
    workers()
    standin.add_fault(
        Fault(method="PUT", status=400, message="No database with supplied ID")
    )
    job_id = send(relay, customer("fixme@example.com", None, "F"))
    assert wait_for_job(client, job_id).get_status() == "failed"

    listed = relay_cli(relay, "failed", "list", "--source", "shopify", "--json")
    [row] = [
        json.loads(line)
        for line in listed.stdout.splitlines()
        if json.loads(line)["job"] == job_id
    ]
    assert row["reason"].startswith(
        "shopify-customer: Copernica answered 400: No database with supplied ID"
    )
    assert row["attempts"] == 1
    assert "fixme@" not in listed.stdout

    shown = relay_cli(relay, "failed", "show", job_id)
    assert json.loads(shown.stdout)["topic"] == "customers/update"

    requeued = relay_cli(relay, "failed", "requeue", job_id)
    assert requeued.returncode == 0, requeued.stderr
    job = wait_for_job(client, job_id)
    assert job.get_status() == "finished"
    assert [r.status for r in writes(standin)] == [400, 303]
    assert len(profiles_with(standin, "fixme@example.com")) == 1


def test_purge_needs_a_choice_and_removes_what_was_chosen(
    relay, standin, client, workers
):
    workers()
    standin.add_fault(Fault(method="PUT", status=400, message="Invalid data provided"))
    job_id = send(relay, customer("purge@example.com", None, "P"))
    wait_for_job(client, job_id)

    refused = relay_cli(relay, "failed", "purge")
    assert refused.returncode != 0
    assert "name job or delivery ids" in refused.stderr

    purged = relay_cli(
        relay, "failed", "purge", "--topic", "customers/update", "--since", "2020-01-01"
    )
    assert purged.returncode == 0, purged.stderr
    assert job_id not in relay_cli(relay, "failed", "list").stdout
    assert not client.exists(f"rq:job:{job_id}")


def test_a_timed_out_write_keeps_the_profile_locked_so_it_cannot_undo_a_newer_one(
    relay, standin, client, workers
):
    workers()
    # The older event's PUT outlives the 2 s read timeout; Copernica applies
    # it anyway, 4 s after it arrived.
    standin.add_fault(Fault(method="PUT", status=None, delay=4))
    older = customer("late@example.com", "2026-08-14T10:00:00+00:00", "Older")
    newer = customer("late@example.com", "2026-08-14T11:00:00+00:00", "Newer")

    first = send(relay, older)
    wait_for_arrivals(standin, 1)
    second = send(relay, newer)
    for job_id in (first, second):
        wait_for_job(client, job_id, timeout=30)

    [profile] = profiles_with(standin, "late@example.com")
    assert profile["fields"]["firstname"] == "Newer"
    assert "profile lock kept until it expires" in relay.logs()


def test_workers_outlive_a_redis_restart(relay, standin, client, workers, own_redis):
    [worker] = workers()
    # The worker is mid-delivery when Redis goes away for 3 s.
    standin.add_fault(Fault(method="PUT", status=None, delay=1.5))
    busy = send(relay, customer("during@example.com", None, "D"))
    wait_for_arrivals(standin, 1)

    own_redis.stop()
    time.sleep(3.0)
    own_redis.start()
    assert wait_for_job(client, busy, timeout=60).get_status() == "finished"
    job = wait_for_job(
        client, send(relay, customer("after@example.com", None, "A")), timeout=40
    )

    assert worker.process.poll() is None
    assert job.get_status() == "finished"
    assert len(profiles_with(standin, "after@example.com")) == 1
