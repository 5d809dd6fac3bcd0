"""Failed deliveries: what RQ's failed registry holds, as an operator reads it.

A delivery ends here when Copernica refused it (a 4xx), when its retries ran
out, or when its mapping could not be applied. It stays for RELAY_FAILED_TTL
(30 days by default), then RQ drops it. Requeueing puts the same delivery
back on the queue with a fresh retry schedule; the worker maps it with the
mapping in force then, and calls that had already succeeded are not repeated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry

from app.logs import mask_text


@dataclass(frozen=True)
class FailedDelivery:
    job_id: str
    delivery_id: str
    source: str
    topic: str
    account: str | None
    reason: str
    failed_at: datetime | None
    attempts: int
    job: Job

    def summary(self) -> dict[str, object]:
        """One line's worth, personal data masked."""
        return {
            "job": self.job_id,
            # The id is the sender's header: it may carry anything.
            "delivery": mask_text(self.delivery_id),
            "source": self.source,
            "topic": self.topic,
            "failed_at": self.failed_at.isoformat(timespec="seconds")
            if self.failed_at
            else None,
            "attempts": self.attempts,
            "reason": mask_text(self.reason),
        }


def failed_deliveries(queue: Queue) -> list[FailedDelivery]:
    registry = FailedJobRegistry(queue=queue)
    ids = registry.get_job_ids()
    jobs = Job.fetch_many(ids, connection=queue.connection, serializer=queue.serializer)
    return [_describe(job) for job in jobs if job is not None]


def newest(queue: Queue, limit: int) -> list[FailedDelivery]:
    """The ``limit`` deliveries that failed last, newest first.

    Reads only those jobs, so a page can show a long failed list cheaply.
    """
    registry = FailedJobRegistry(queue=queue)
    ids = registry.get_job_ids(0, limit - 1, desc=True)
    jobs = Job.fetch_many(ids, connection=queue.connection, serializer=queue.serializer)
    return [_describe(job) for job in jobs if job is not None]


def find(queue: Queue, job_ids: Iterable[str]) -> list[FailedDelivery]:
    """Those of ``job_ids`` that are still in the failed list."""
    registry = FailedJobRegistry(queue=queue)
    present = [job_id for job_id in dict.fromkeys(job_ids) if job_id in registry]
    jobs = Job.fetch_many(
        present, connection=queue.connection, serializer=queue.serializer
    )
    return [_describe(job) for job in jobs if job is not None]


def _describe(job: Job) -> FailedDelivery:
    record = job.args[0] if job.args and isinstance(job.args[0], dict) else {}
    meta = job.meta or {}
    return FailedDelivery(
        job_id=job.id,
        delivery_id=str(record.get("delivery_id", "?")),
        source=str(record.get("source", "?")),
        topic=str(record.get("topic", "?")),
        account=record.get("account"),
        reason=meta.get("reason") or _last_line(job),
        failed_at=_aware(job.ended_at),
        attempts=int(meta.get("attempts") or meta.get("failures", 0) or 1),
        job=job,
    )


def _last_line(job: Job) -> str:
    # Failures the relay did not raise itself (a job killed by RQ's time
    # limit, say) carry only RQ's traceback; its last line names the error.
    result = job.latest_result()
    text = (result.exc_string if result else None) or job.exc_info or ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no reason recorded"


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def select(
    deliveries: Iterable[FailedDelivery],
    source: str | None = None,
    topic: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    ids: Iterable[str] = (),
) -> list[FailedDelivery]:
    """Those matching every filter given; ``ids`` are job or delivery ids."""
    wanted = set(ids)
    chosen = []
    for item in deliveries:
        if wanted and not wanted & {item.job_id, item.delivery_id}:
            continue
        if source and item.source != source:
            continue
        if topic and item.topic != topic:
            continue
        if since and (item.failed_at is None or item.failed_at < since):
            continue
        if until and (item.failed_at is None or item.failed_at > until):
            continue
        chosen.append(item)
    return chosen


def requeue(queue: Queue, item: FailedDelivery) -> None:
    """Back on the queue, with the retry schedule starting over."""
    job = item.job
    for stale in ("failures", "attempts", "reason", "failed_at"):
        job.meta.pop(stale, None)
    job.meta["requeued"] = int(job.meta.get("requeued", 0)) + 1
    job.save_meta()
    FailedJobRegistry(queue=queue).requeue(job.id)


def purge(queue: Queue, item: FailedDelivery) -> None:
    registry = FailedJobRegistry(queue=queue)
    try:
        registry.remove(item.job, delete_job=True)
    except NoSuchJobError:
        pass
