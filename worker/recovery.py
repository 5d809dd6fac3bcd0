"""The relay's RQ worker: what a dead worker left behind is picked up again.

A worker killed mid-job (SIGKILL, a Heroku dyno restart after its 30 s grace,
an out-of-memory kill) leaves two things behind:

- its job in RQ's started registry. RQ's own clean-up would move it to the
  failed list; here it is put back on the queue, because a delivery that was
  cut off has not failed. The job's entry expires a few seconds after its
  time limit, since a living worker would have stopped it by then; the first
  worker to claim the entry (ZREM) requeues the job, so two never both do.
- the scheduler lock of its queue, which RQ keeps for 61 s. Until it expires
  no other worker's scheduler brings back retried deliveries. A lock not
  renewed for STALE_SCHEDULER_SECONDS is released and taken over.
"""

from __future__ import annotations

import logging
import time

from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError, StopRequested
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.scheduler import RQScheduler
from rq.utils import parse_composite_key

log = logging.getLogger("relay.worker")

#: Seconds after a job's time limit at which its started entry counts as
#: abandoned: the worker that ran it would have stopped it by then.
ABANDON_GRACE_SECONDS = 5

#: Recovery claims entries this much before RQ's own clean-up would see them
#: expire, so RQ never fails a job the relay is about to requeue.
CLAIM_AHEAD_SECONDS = 2

#: A scheduler beats every second; one silent this long has died.
STALE_SCHEDULER_SECONDS = 15

#: What RQ sets its scheduler lock's time to live to on every beat
#: (its interval of 1 s plus 60).
SCHEDULER_LOCK_SECONDS = 61

#: Deletes a scheduler lock only while the same dead scheduler holds it.
RELEASE_STALE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


#: Moves a started-registry entry into the recovery set, if still there, in
#: one step: whoever moves it requeues the job; if that worker dies before it
#: is done, the entry is still found in the recovery set later.
CLAIM_ENTRY = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  return 1
end
return 0
"""

#: Takes over a recovery-set entry left by a worker that died while
#: requeueing, if its claim is still the stale one that was read.
RECLAIM_ENTRY = """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""

#: How long a stopping worker waits for its command listener to end; a
#: listener still reading after that is a daemon thread and ends with it.
UNSUBSCRIBE_WAIT_SECONDS = 2

#: A recovery claim older than this belongs to a worker that died mid-way.
STALE_CLAIM_SECONDS = 30


def recovery_key(queue: Queue) -> str:
    return f"relay:recovering:{queue.name}"


def recover_abandoned(queue: Queue) -> list[str]:
    """Requeue jobs whose worker died while running them; return their ids."""
    connection = queue.connection
    started = StartedJobRegistry(queue=queue).key
    recovering = recovery_key(queue)
    now = time.time()

    claimed = []
    for entry in connection.zrangebyscore(started, 0, now + CLAIM_AHEAD_SECONDS):
        if connection.eval(CLAIM_ENTRY, 2, started, recovering, entry, now):
            claimed.append(entry)
    stale = connection.zrangebyscore(
        recovering, 0, now - STALE_CLAIM_SECONDS, withscores=True
    )
    for entry, score in stale:
        if connection.eval(RECLAIM_ENTRY, 1, recovering, entry, repr(score), now):
            claimed.append(entry)

    recovered = []
    for entry in claimed:
        job_id, _ = parse_composite_key(entry.decode())
        if _requeue(queue, job_id):
            recovered.append(job_id)
        connection.zrem(recovering, entry)
    return recovered


def _requeue(queue: Queue, job_id: str) -> bool:
    try:
        job = Job.fetch(
            job_id, connection=queue.connection, serializer=queue.serializer
        )
    except NoSuchJobError:
        return False
    if job.get_status(refresh=True) != JobStatus.STARTED:
        return False  # finished after all, or already requeued by a claimer

    job.meta["abandoned"] = int(job.meta.get("abandoned", 0)) + 1
    job.save_meta()
    queue.enqueue_job(job, at_front=True)
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
    return True


def release_stale_scheduler_lock(queue: Queue) -> bool:
    """Free the queue's scheduler lock if its holder stopped refreshing it.

    A living scheduler renews its lock to 61 s every second; a lock with less
    than 61 - STALE_SCHEDULER_SECONDS left has not been renewed for that long.
    """
    connection = queue.connection
    lock_key = RQScheduler.get_locking_key(queue.name)
    holder = connection.get(lock_key)
    if holder is None:
        return False
    left = connection.pttl(lock_key) / 1000
    if left < 0 or left > SCHEDULER_LOCK_SECONDS - STALE_SCHEDULER_SECONDS:
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

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        # RQ beats three times per job outside any pipeline, three commands
        # and three round trips each; the same commands sent together cost
        # one. (A non-transactional pipeline: nothing here needs MULTI.)
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        with self.connection.pipeline(transaction=False) as beat:
            super().heartbeat(timeout, pipeline=beat)
            beat.execute()

    def handle_exception(self, job: Job, *exc_info) -> None:
        # A delivery that failed for a known reason was logged by the relay in
        # one line; RQ's traceback at error level would only repeat it.
        if exc_info and getattr(exc_info[0], "__name__", "") == "DeliveryFailed":
            return
        super().handle_exception(job, *exc_info)

    def unsubscribe(self) -> None:
        # RQ stops its command listener with redis-py's PubSubWorkerThread.stop(),
        # which since redis-py 8 waits for the listener's current read, up to
        # RQ's 60 s, whenever the listener has already taken the UNSUBSCRIBE
        # reply: a worker could take a minute to exit after its last job (past
        # Heroku's 30 s grace). Stopping the listener first means that reply
        # wakes it to find itself stopped; it closes its connection itself.
        thread = self.pubsub_thread
        if thread is None:
            return
        self.log.info("Worker %s: unsubscribing from its channel", self.name)
        thread.stop(timeout=0)
        self.pubsub.unsubscribe()
        thread.join(timeout=UNSUBSCRIBE_WAIT_SECONDS)
        if not thread.is_alive():
            self.pubsub.close()

    def clean_registries(self) -> None:
        for queue in self.queues:
            try:
                recover_abandoned(queue)
                if release_stale_scheduler_lock(queue) and self.scheduler:
                    # Take over now rather than at the next maintenance.
                    self.scheduler.acquire_locks(auto_start=True)
            except StopRequested:
                raise
            except Exception:
                log.exception("recovering after a dead worker failed")
        super().clean_registries()
