"""Storing a delivery in Redis: deduplicated and queued in one transaction.

The dedupe key and the queued job are written by one MULTI/EXEC, so Redis
holds both or neither. A crash or a lost connection between the two can
therefore never leave a dedupe key without its event, which would make the
sender's retry look like a duplicate and lose the event. WATCH on the dedupe
key turns a concurrent copy of the same delivery into a duplicate answer.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import redis
from rq import Queue
from rq.job import Job

from app.deliveries import Delivery

DEDUPE_PREFIX = "relay:dedupe:"
DELIVER_FUNCTION = "worker.jobs.deliver"


@dataclass(frozen=True)
class Stored:
    job_id: str
    duplicate: bool


def dedupe_key(source: str, delivery_id: str) -> str:
    digest = hashlib.sha256(delivery_id.encode()).hexdigest()
    return f"{DEDUPE_PREFIX}{source}:{digest}"


def store(
    queue: Queue,
    delivery: Delivery,
    dedupe_ttl: int,
    result_ttl: int,
    failure_ttl: int,
    job_timeout: int,
) -> Stored:
    """Queue ``delivery`` unless the same delivery was accepted before.

    Raises redis.RedisError when Redis cannot take it; then nothing is stored.
    """
    key = dedupe_key(delivery.source, delivery.delivery_id)
    job = Job.create(
        DELIVER_FUNCTION,
        args=[delivery.to_dict()],
        connection=queue.connection,
        serializer=queue.serializer,
        id=uuid.uuid4().hex,
        timeout=job_timeout,
        result_ttl=result_ttl,
        failure_ttl=failure_ttl,
        # RQ logs the description; the default one would hold the whole body.
        description=delivery.label,
    )

    with queue.connection.pipeline() as pipe:
        for _ in range(3):
            try:
                pipe.watch(key)
                existing = pipe.get(key)
                if existing is not None:
                    return Stored(job_id=existing.decode(), duplicate=True)

                pipe.multi()
                pipe.set(key, job.id, ex=dedupe_ttl)
                queue.enqueue_job(job, pipeline=pipe)
                pipe.execute()
                return Stored(job_id=job.id, duplicate=False)
            except redis.WatchError:
                # Someone stored the same delivery meanwhile; look again.
                pipe.reset()
                continue
            except redis.ResponseError:
                # Redis ran the transaction but a command in it failed (Redis
                # does not roll back): the key may be held for an event that
                # was not queued. Release it so the sender's retry is taken.
                _release(queue, key, job)
                raise
    raise redis.RedisError(f"dedupe key {key} kept changing; not stored")


#: Deletes the dedupe key only while it still names this job.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _release(queue: Queue, key: str, job: Job) -> None:
    connection = queue.connection
    try:
        connection.eval(RELEASE_SCRIPT, 1, key, job.id)
        connection.lrem(queue.key, 0, job.id)
        connection.delete(job.key)
    except redis.RedisError:
        # Nothing more can be done now; the 503 still makes the sender retry,
        # and the key expires after the dedupe window.
        pass
