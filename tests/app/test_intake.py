"""Storing a delivery with one script: the same job RQ would queue, once."""

from __future__ import annotations

import json
import threading
import zlib

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from app import intake
from app.deliveries import Delivery
from tests.harness import fixture_bytes

QUEUE = "intake-test"


def delivery(delivery_id: str = "d-1") -> Delivery:
    return Delivery(
        source="shopify",
        topic="customers/create",
        delivery_id=delivery_id,
        account="shop.myshopify.com",
        received_at="2026-12-04T18:00:00.000000+00:00",
        event_at="2026-12-04T17:59:59Z",
        event_id="e-1",
        body=json.loads(fixture_bytes("shopify/customers_create.json")),
    )


def store(queue: Queue, item: Delivery, result_ttl: int = 3600) -> intake.Stored:
    return intake.store(
        queue,
        item,
        dedupe_ttl=600,
        result_ttl=result_ttl,
        failure_ttl=7200,
        job_timeout=28,
    )


@pytest.fixture
def queue(redis_client):
    queue = Queue(QUEUE, connection=redis_client, serializer=JSONSerializer)
    yield queue
    # Only what these tests wrote: the Redis server is shared by the session.
    if redis_client.type(queue.key) == b"list":
        for job_id in redis_client.lrange(queue.key, 0, -1):
            redis_client.delete(f"rq:job:{job_id.decode()}")
    redis_client.delete(queue.key)
    redis_client.srem("rq:queues", queue.key)
    for key in redis_client.scan_iter(f"{intake.DEDUPE_PREFIX}*"):
        redis_client.delete(key)


def rq_enqueued(queue: Queue, item: Delivery, result_ttl: int = 3600) -> Job:
    """The same delivery queued by RQ's own Job.create and enqueue_job."""
    job = Job.create(
        intake.DELIVER_FUNCTION,
        args=[item.to_dict()],
        connection=queue.connection,
        serializer=JSONSerializer,
        timeout=28,
        result_ttl=result_ttl,
        failure_ttl=7200,
        description=item.label,
    )
    return queue.enqueue_job(job)


@pytest.mark.parametrize("result_ttl", [3600, 0], ids=["kept", "privacy"])
def test_the_job_hash_is_the_one_rq_writes(queue, redis_client, result_ttl):
    item = delivery()
    stored = store(queue, item, result_ttl=result_ttl)
    ours = redis_client.hgetall(f"rq:job:{stored.job_id}")
    theirs = redis_client.hgetall(rq_enqueued(queue, item, result_ttl).key)

    assert ours.keys() == theirs.keys()
    # Times differ by the moment, and the compressed bytes may differ too;
    # what they hold must not.
    for name in (b"created_at", b"enqueued_at"):
        assert utcparse(ours.pop(name).decode())
        assert utcparse(theirs.pop(name).decode())
    data = ours.pop(b"data"), theirs.pop(b"data")
    assert json.loads(zlib.decompress(data[0])) == json.loads(zlib.decompress(data[1]))
    assert ours == theirs


def test_the_job_is_queued_where_rq_queues_it(queue, redis_client):
    stored = store(queue, delivery())

    assert redis_client.lrange(queue.key, 0, -1) == [stored.job_id.encode()]
    assert queue.key.encode() in redis_client.smembers("rq:queues")
    assert redis_client.ttl(f"rq:job:{stored.job_id}") == -1  # as RQ leaves it

    job = Job.fetch(stored.job_id, connection=redis_client, serializer=JSONSerializer)
    assert job.func_name == intake.DELIVER_FUNCTION
    assert job.args == [json.loads(json.dumps(delivery().to_dict()))]
    assert job.get_status() == "queued"
    assert job.origin == QUEUE
    assert (job.timeout, job.result_ttl, job.failure_ttl) == (28, 3600, 7200)
    assert queue.job_ids == [stored.job_id]


def test_a_resent_delivery_gets_the_first_job(queue, redis_client):
    first = store(queue, delivery("again"))
    second = store(queue, delivery("again"))

    assert (first.duplicate, second.duplicate) == (False, True)
    assert second.job_id == first.job_id
    assert redis_client.llen(queue.key) == 1
    key = intake.dedupe_key("shopify", "again")
    assert redis_client.get(key) == first.job_id.encode()
    assert 0 < redis_client.ttl(key) <= 600


def test_copies_arriving_together_give_one_job(queue, redis_server):
    results: list[intake.Stored] = []
    start = threading.Barrier(8)

    def send() -> None:
        client = redis.Redis.from_url(redis_server.url)
        own = Queue(QUEUE, connection=client, serializer=JSONSerializer)
        start.wait()
        results.append(store(own, delivery("together")))
        client.close()

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(r.duplicate for r in results) == [False] + [True] * 7
    assert len({r.job_id for r in results}) == 1
    assert queue.count == 1


def test_a_store_that_fails_half_way_leaves_nothing(queue, redis_client):
    # A queue key of the wrong type makes the push fail inside the script,
    # after the job hash was written: Redis does not roll that back.
    redis_client.set(queue.key, "not a list")
    jobs_before = set(redis_client.scan_iter("rq:job:*"))

    with pytest.raises(redis.ResponseError):
        store(queue, delivery("half"))

    assert not redis_client.exists(intake.dedupe_key("shopify", "half"))
    assert set(redis_client.scan_iter("rq:job:*")) == jobs_before


def test_a_flushed_script_cache_is_refilled(queue, redis_client):
    store(queue, delivery("before"))
    redis_client.script_flush()

    stored = store(queue, delivery("after"))

    assert not stored.duplicate
    assert redis_client.llen(queue.key) == 2


def test_a_delivery_is_stored_in_one_round_trip(queue, redis_client):
    store(queue, delivery("warm-up"))  # the script is loaded once, not per call
    redis_client.config_resetstat()

    store(queue, delivery("measured"))

    calls = {
        name.removeprefix("cmdstat_"): stats["calls"]
        for name, stats in redis_client.info("commandstats").items()
    }
    # One EVALSHA from the client; what the script runs is counted as well.
    assert calls.pop("evalsha") == 1
    assert set(calls) <= {"get", "sadd", "hset", "rpush", "set", "config"}


def test_a_small_event_is_kept_as_a_compact_hash(queue):
    # The embedded Redis (and the compose file's) allow 1 KB values in a
    # compact hash: a queued customer event takes about 0.9 KB, not 2.3 KB.
    stored = store(queue, delivery("compact-1"))
    job_key = Job.redis_job_namespace_prefix + stored.job_id

    assert queue.connection.object("encoding", job_key) in (b"ziplist", b"listpack")
    assert queue.connection.memory_usage(job_key) < 1200
