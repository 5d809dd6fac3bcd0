"""The relay's RQ worker: what a dead worker left behind is picked up again.

A worker killed mid-job (SIGKILL, a Heroku dyno restart after its 30 s grace,
an out-of-memory kill) leaves two things behind:

- its job in RQ's started registry. RQ's own clean-up would move it to the
  failed list; here it is put back on the queue, because a delivery that was
  cut off has not failed. The job's entry expires a few seconds after its
  time limit, since a living worker would have stopped it by then; the first
  worker to claim the entry (ZREM) requeues the job, so two never both do.
- the scheduler lock of its queue, which RQ keeps for 61 s. Until it expires
  no other worker's scheduler brings back retried deliveries. A lock whose
  holder has not sent a heartbeat for STALE_SCHEDULER_SECONDS is released.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.utils import parse_composite_key, utcparse

log = logging.getLogger("relay.worker")

#: Seconds after a job's time limit at which its started entry counts as
#: abandoned: the worker that ran it would have stopped it by then.
ABANDON_GRACE_SECONDS = 5

#: Recovery claims entries this much before RQ's own clean-up would see them
#: expire, so RQ never fails a job the relay is about to requeue.
CLAIM_AHEAD_SECONDS = 2

#: A scheduler beats every second; one silent this long has died.
STALE_SCHEDULER_SECONDS = 15

#: Deletes a scheduler lock only while the same dead scheduler holds it.
RELEASE_STALE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def recover_abandoned(queue: Queue) -> list[str]:
    """Requeue jobs whose worker died while running them; return their ids."""
    connection = queue.connection
    registry = StartedJobRegistry(queue=queue)
    cutoff = time.time() + CLAIM_AHEAD_SECONDS
    recovered = []
    for entry in connection.zrangebyscore(registry.key, 0, cutoff):
        if connection.zrem(registry.key, entry) != 1:
            continue  # another worker claimed it first
        job_id, _ = parse_composite_key(entry.decode())
        try:
            job = Job.fetch(job_id, connection=connection, serializer=queue.serializer)
        except NoSuchJobError:
            continue
        if job.get_status(refresh=True) != JobStatus.STARTED:
            continue

        job.meta["abandoned"] = int(job.meta.get("abandoned", 0)) + 1
        job.save_meta()
        queue.enqueue_job(job, at_front=True)
        recovered.append(job.id)
        log.warning(
            "abandoned delivery requeued",
            extra={
                "fields": {
                    "job": job.id,
                    "delivery": job.description,
                    "outcome": "requeued",
                }
            },
        )
    return recovered


def release_stale_scheduler_lock(queue: Queue) -> bool:
    """Free the queue's scheduler lock if its holder stopped beating."""
    connection = queue.connection
    lock_key = RQScheduler.get_locking_key(queue.name)
    holder = connection.get(lock_key)
    if holder is None:
        return False
    beat = connection.hget(SCHEDULER_KEY_TEMPLATE % holder.decode(), "last_heartbeat")
    if beat is not None:
        silent = (datetime.now(UTC) - utcparse(beat.decode())).total_seconds()
        if silent < STALE_SCHEDULER_SECONDS:
            return False
    released = connection.eval(RELEASE_STALE_LOCK, 1, lock_key, holder) == 1
    if released:
        log.warning(
            "scheduler lock of a dead worker released",
            extra={"fields": {"queue": queue.name}},
        )
    return released


class RelayWorker(SimpleWorker):
    """SimpleWorker that requeues abandoned deliveries instead of failing them."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # RQ adds 60 s to the time limit; a shorter grace finds abandoned
        # deliveries sooner. The job cannot outlive its limit anyway.
        return int(job.timeout or 0) + ABANDON_GRACE_SECONDS

    def handle_exception(self, job: Job, *exc_info) -> None:
        # A delivery that failed for a known reason was logged by the relay in
        # one line; RQ's traceback at error level would only repeat it.
        if exc_info and getattr(exc_info[0], "__name__", "") == "DeliveryFailed":
            return
        super().handle_exception(job, *exc_info)

    def clean_registries(self) -> None:
        for queue in self.queues:
            try:
                recover_abandoned(queue)
                release_stale_scheduler_lock(queue)
            except Exception:
                log.exception("recovering after a dead worker failed")
        super().clean_registries()
