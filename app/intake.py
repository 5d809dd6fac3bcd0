"""Storing a delivery in Redis: deduplicated and queued in one round trip.

One Lua script looks up the dedupe key and, for a new delivery, writes the
RQ job hash, registers the queue, pushes the job id and sets the dedupe key.
Redis runs a script as one step, so no other client sees half of it, and two
copies of a delivery that arrive at the same moment give one job. Redis holds
both the dedupe key and the queued job or neither: a crash or a lost
connection can never leave a dedupe key without its event, which would make
the sender's retry look like a duplicate and lose the event.

The job is written exactly as RQ 3.0's ``Queue.enqueue_job`` writes it (the
hash of ``Job.to_dict()``, ``SADD rq:queues``, ``RPUSH`` onto the queue), so
unchanged RQ workers take it; tests/app/test_intake.py compares the two. RQ's
own enqueue costs a WATCH, a GET and a transaction: three round trips and a
Job object per request, which bounded the web process's throughput.
"""

from __future__ import annotations

import hashlib
import json
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from redis.commands.core import Script
from rq import Queue
from rq.job import Job

from app.deliveries import Delivery

DEDUPE_PREFIX = "relay:dedupe:"
DELIVER_FUNCTION = "worker.jobs.deliver"

#: RQ's timestamp format (rq.utils.utcformat).
RQ_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

#: KEYS: dedupe key, job hash, queue list, RQ's set of queues.
#: ARGV: job id, dedupe TTL in seconds, then the job's own values in the
#: order job_values() gives them.
#: Returns the job id already stored for a duplicate, nil for a new job.
#:
#: The job hash has the fields of RQ 3.0's Job.to_dict() for a delivery job;
#: those that are the same for every delivery are written here rather than
#: sent, because each argument costs the web process time to encode.
#: The dedupe key is written last: should a command fail half-way (Redis does
#: not roll back a script), no dedupe key is left to turn the sender's retry
#: into a duplicate, and the release script removes the rest.
STORE_SCRIPT = """
local existing = redis.call('GET', KEYS[1])
if existing then
  return existing
end
redis.call('SADD', KEYS[4], KEYS[3])
redis.call('HSET', KEYS[2],
  'created_at', ARGV[3], 'data', ARGV[4],
  'success_callback_name', '', 'failure_callback_name', '',
  'stopped_callback_name', '', 'started_at', '', 'ended_at', '',
  'last_heartbeat', '', 'worker_name', '', 'group_id', '',
  'origin', ARGV[5], 'description', ARGV[6], 'enqueued_at', ARGV[3],
  'timeout', ARGV[7], 'result_ttl', ARGV[8], 'failure_ttl', ARGV[9],
  'status', 'queued')
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

#: KEYS: dedupe key, job hash, queue list. ARGV: job id.
#: Undoes a store that failed half-way; the dedupe key only while it still
#: names this job (a copy of the delivery may have been stored meanwhile).
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
if redis.call('TYPE', KEYS[3]).ok == 'list' then
  redis.call('LREM', KEYS[3], 0, ARGV[1])
end
return redis.call('DEL', KEYS[2])
"""


@dataclass(frozen=True)
class Stored:
    job_id: str
    duplicate: bool


def dedupe_key(source: str, delivery_id: str) -> str:
    digest = hashlib.sha256(delivery_id.encode()).hexdigest()
    return f"{DEDUPE_PREFIX}{source}:{digest}"


def job_values(
    queue_name: str,
    delivery: Delivery,
    result_ttl: int,
    failure_ttl: int,
    job_timeout: int,
    now: datetime,
) -> list:
    """The values of the RQ job hash that differ per delivery.

    They are what Job.create and Queue.enqueue_job would store for
    ``delivery`` with the JSON serializer, the same function and options.
    """
    # RQ stores (function, instance, args, kwargs), serialised and compressed.
    call = [DELIVER_FUNCTION, None, [delivery.to_dict()], {}]
    return [
        # Created and queued at the same moment, as far as RQ can tell.
        now.strftime(RQ_TIME_FORMAT),
        zlib.compress(json.dumps(call).encode()),
        queue_name,
        # RQ logs the description; the default one would hold the whole body.
        delivery.label,
        job_timeout,
        result_ttl,
        failure_ttl,
    ]


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
    job_id = uuid.uuid4().hex
    job_key = Job.redis_job_namespace_prefix + job_id
    values = job_values(
        queue.name,
        delivery,
        result_ttl,
        failure_ttl,
        job_timeout,
        datetime.now(UTC),
    )

    connection = queue.connection
    try:
        existing = _STORE(
            keys=[key, job_key, queue.key, queue.redis_queues_keys],
            args=[job_id, dedupe_ttl, *values],
            client=connection,
        )
    except redis.ResponseError:
        # Redis ran the script but a command in it failed, and a script is
        # not rolled back: release what it wrote so the sender's retry is
        # taken.
        _release(connection, [key, job_key, queue.key], job_id)
        raise

    if existing is not None:
        return Stored(job_id=existing.decode(), duplicate=True)
    return Stored(job_id=job_id, duplicate=False)


#: redis-py's Script sends EVALSHA and, on NOSCRIPT (a restarted or flushed
#: Redis), loads the script and sends it again. Each call names its client,
#: so the scripts are bound to none; given as bytes, they need no encoder.
_STORE = Script(None, STORE_SCRIPT.encode())
_RELEASE = Script(None, RELEASE_SCRIPT.encode())


def _release(connection: redis.Redis, keys: list[str], job_id: str) -> None:
    try:
        _RELEASE(keys=keys, args=[job_id], client=connection)
    except redis.RedisError:
        # Nothing more can be done now; the 503 still makes the sender retry,
        # and the key expires after the dedupe window.
        pass
