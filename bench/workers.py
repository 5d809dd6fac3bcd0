"""What the delivery benchmarks share: queued deliveries, worker runs, figures.

Also runnable, to drain the queue with one of RQ's own worker classes under
the relay's settings (the delivery benchmark compares against them):

    .venv/bin/python -m bench.workers {forking,simple}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import redis
from rq import Queue, SimpleWorker, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from app import intake
from app.connections import connect
from app.deliveries import Delivery
from bench.common import ROOT
from tests.harness import FIXTURES
from worker.recovery import RelayWorker

CUSTOMERS_BODY = json.loads(
    (FIXTURES / "shopify" / "customers_create.json").read_bytes()
)


class ForkingWorker(Worker):
    # RQ's default worker, with only the relay's quick exit after the last job
    # (see RelayWorker.unsubscribe): its per-job work is RQ's own.
    unsubscribe = RelayWorker.unsubscribe


class PlainSimpleWorker(SimpleWorker):
    unsubscribe = RelayWorker.unsubscribe


#: RQ's own worker classes, run by ``python -m bench.workers``.
RQ_CLASSES = {"forking": ForkingWorker, "simple": PlainSimpleWorker}


def customer_delivery(number: int, customers: int, prefix: str) -> Delivery:
    """A customers/create delivery for customer ``number % customers``."""
    return Delivery(
        source="shopify",
        topic="customers/create",
        delivery_id=f"{prefix}-{number}",
        account="bench.myshopify.com",
        received_at="2026-12-04T00:00:00+00:00",
        event_at=None,
        event_id=None,
        body={**CUSTOMERS_BODY, "email": f"customer{number % customers}@example.com"},
    )


def queue_deliveries(
    queue: Queue, count: int, customers: int, prefix: str
) -> list[str]:
    """Queue ``count`` customers/create deliveries for ``customers`` customers
    in turn, through the web process's own intake code; their job ids."""
    job_ids = []
    for number in range(count):
        stored = intake.store(
            queue,
            customer_delivery(number, customers, prefix),
            dedupe_ttl=3600,
            result_ttl=3600,
            failure_ttl=3600,
            job_timeout=28,
        )
        job_ids.append(stored.job_id)
    return job_ids


def queue_noops(queue: Queue, count: int, with_record: bool = False) -> list[str]:
    """Jobs that do nothing: with no argument, or (``with_record``) with a
    delivery record like the real jobs', so RQ stores, loads and decodes as
    much data for them as for a delivery."""
    if not with_record:
        return [
            queue.enqueue("worker.retry.parse_retry_after", None).id
            for _ in range(count)
        ]
    return [
        queue.enqueue(
            ignore, customer_delivery(number, 1, "noop").to_dict(), result_ttl=3600
        ).id
        for number in range(count)
    ]


def ignore(record: dict) -> None:
    """The no-op job that takes a delivery record."""


def redis_commands(connection: redis.Redis) -> int:
    """Commands Redis has run so far (INFO commandstats, INFO itself left out)."""
    stats = connection.info("commandstats")
    return sum(
        entry["calls"] for name, entry in stats.items() if name != "cmdstat_info"
    )


def jobs_per_second(connection: redis.Redis, job_ids: list[str]) -> float:
    """From the first job's start to the last one's end: start-up left out."""
    jobs = Job.fetch_many(job_ids, connection=connection, serializer=JSONSerializer)
    started = min(job.started_at for job in jobs)
    ended = max(job.ended_at for job in jobs)
    return round(len(job_ids) / (ended - started).total_seconds(), 1)


def worker_command(kind: str, profile: Path | None = None) -> list[str]:
    """The relay's worker (``relay``), or one of RQ_CLASSES, in burst mode."""
    python = [sys.executable]
    if profile is not None:
        python += ["-m", "cProfile", "-o", str(profile)]
    if kind == "relay":
        return python + ["-m", "worker", "--burst"]
    return python + ["-m", "bench.workers", kind]


def drain(kind: str, env: dict, timeout: float, profile: Path | None = None) -> float:
    """Run one burst worker until the queue is empty; the wall seconds taken."""
    started = time.monotonic()
    subprocess.run(
        worker_command(kind, profile),
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=timeout,
    )
    return round(time.monotonic() - started, 2)


def _run_rq_worker(kind: str) -> None:
    # The settings a relay worker reads (REDIS_URL, RELAY_QUEUE) decide where
    # RQ's worker looks; the jobs load the relay's settings themselves.
    from worker.jobs import context

    settings = context().settings
    connection = connect(settings.redis_url, tls_verify=settings.redis_tls_verify)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    worker = RQ_CLASSES[kind]([queue], connection=connection, serializer=JSONSerializer)
    worker.work(burst=True, logging_level="WARNING")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in RQ_CLASSES:
        sys.exit(__doc__)
    _run_rq_worker(sys.argv[1])
