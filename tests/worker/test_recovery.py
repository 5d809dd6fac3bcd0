"""Recovery after a dead worker, against a real Redis."""

from __future__ import annotations

import time

import pytest
import redis
from redis.client import PubSub
from rq import Queue
from rq.job import JobStatus
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from worker.recovery import (
    STALE_CLAIM_SECONDS,
    RelayWorker,
    recover_abandoned,
    recovery_key,
    release_stale_scheduler_lock,
)


@pytest.fixture
def queue(redis_client):
    queue = Queue("recovery-test", connection=redis_client, serializer=JSONSerializer)
    yield queue
    for key in redis_client.scan_iter("*recovery-test*"):
        redis_client.delete(key)


def started_job(queue):
    job = queue.enqueue("worker.retry.parse_retry_after", None)
    queue.connection.lpop(queue.key)  # as a worker dequeues it
    job.set_status(JobStatus.STARTED)
    return job


def test_a_claim_left_by_a_worker_that_died_mid_recovery_is_taken_over(queue):
    job = started_job(queue)
    entry = f"{job.id}:execution"
    # The claimer moved the entry, then died before requeueing the job.
    queue.connection.zadd(recovery_key(queue), {entry: time.time() - 2 * 60})

    assert recover_abandoned(queue) == [job.id]
    assert queue.get_job_ids() == [job.id]
    assert queue.connection.zcard(recovery_key(queue)) == 0


def test_a_fresh_claim_is_left_to_the_worker_that_holds_it(queue):
    job = started_job(queue)
    queue.connection.zadd(
        recovery_key(queue), {f"{job.id}:x": time.time() - STALE_CLAIM_SECONDS / 2}
    )

    assert recover_abandoned(queue) == []
    assert queue.get_job_ids() == []


def test_a_finished_job_found_in_a_claim_is_not_run_again(queue):
    job = started_job(queue)
    job.set_status(JobStatus.FINISHED)
    queue.connection.zadd(recovery_key(queue), {f"{job.id}:x": 1})

    assert recover_abandoned(queue) == []
    assert queue.get_job_ids() == []
    assert queue.connection.zcard(recovery_key(queue)) == 0


@pytest.mark.parametrize("ttl_ms, released", [(60_000, False), (40_000, True)])
def test_scheduler_lock_is_released_only_when_not_renewed(queue, ttl_ms, released):
    key = RQScheduler.get_locking_key(queue.name)
    queue.connection.set(key, "some-scheduler", px=ttl_ms)

    assert release_stale_scheduler_lock(queue) is released
    assert (queue.connection.get(key) is None) is released


def test_a_stopping_worker_does_not_wait_a_minute_for_its_command_listener(
    queue, monkeypatch
):
    worker = RelayWorker(
        [queue], connection=queue.connection, serializer=JSONSerializer
    )
    worker.subscribe()
    time.sleep(0.2)  # the listener is waiting for a command (up to 60 s)

    send_unsubscribe = PubSub.unsubscribe

    def unsubscribe_then_pause(self, *args):
        answer = send_unsubscribe(self, *args)
        # As on a busy machine: the listener reads the UNSUBSCRIBE reply
        # before the worker goes on to stop it.
        time.sleep(0.5)
        return answer

    monkeypatch.setattr(PubSub, "unsubscribe", unsubscribe_then_pause)
    started = time.monotonic()
    worker.unsubscribe()
    assert time.monotonic() - started < 5
    assert not worker.pubsub_thread.is_alive()


def test_a_heartbeat_is_one_round_trip_and_still_extends_the_worker(
    redis_server, queue
):
    writes = []

    pool = redis.ConnectionPool.from_url(redis_server.url)

    class Counting(pool.connection_class):
        # One write to the socket per round trip.
        def send_packed_command(self, command, check_health=True):
            writes.append(command)
            return super().send_packed_command(command, check_health)

    pool.connection_class = Counting
    connection = redis.Redis(connection_pool=pool)
    worker = RelayWorker([queue], connection=connection, serializer=JSONSerializer)
    try:
        connection.ping()
        writes.clear()
        worker.heartbeat(90)
        assert len(writes) == 1
        assert connection.hget(worker.key, "last_heartbeat")
        assert 80 < connection.ttl(worker.key) <= 90
    finally:
        connection.delete(worker.key)
        pool.disconnect()
