"""Delivery: how many queued deliveries one worker process applies per second.

Queues N distinct Shopify customer deliveries (through the same intake code as
the web process), then runs one ``python -m worker --burst`` against the
Copernica stand-in, which answers at once. Then, in the same run, the same
worker drains N jobs that do nothing, for the ratio. Rates are counted from
the first job's start to the last job's end, so process start-up is left out.

    .venv/bin/python -m bench.delivery [--jobs 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from app import intake
from app.deliveries import Delivery
from bench.common import ROOT, record
from tests.harness import COPERNICA_TOKEN, DATABASE_FIELDS, relay_env
from tests.standin.copernica import CopernicaStandIn
from tools.embedded_redis import RedisServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument(
        "--max-rps",
        default="0",
        help="COPERNICA_MAX_RPS for the run (0, the default here: no limit, to "
        "measure the relay itself; the relay's own default is 20)",
    )
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory() as scratch,
        CopernicaStandIn(
            access_token=COPERNICA_TOKEN,
            databases={1234: DATABASE_FIELDS},
            put_status=303,
        ) as standin,
    ):
        server = RedisServer(Path(scratch) / "redis", unix_socket=False)
        server.start()
        try:
            figures = measure(server.url, standin, args.jobs, args.max_rps)
        finally:
            server.stop()

    record(
        "delivery",
        {
            "jobs": args.jobs,
            "copernica_max_rps": args.max_rps,
            "worker": "RelayWorker (SimpleWorker), 1 process",
            "standin": "answers at once",
        },
        figures,
    )


def measure(redis_url: str, standin: CopernicaStandIn, jobs: int, max_rps: str) -> dict:
    connection = redis.Redis.from_url(redis_url)
    queue = Queue("deliveries", connection=connection, serializer=JSONSerializer)
    body = json.loads(
        (ROOT.parent / "shared/fixtures/shopify/customers_create.json").read_bytes()
    )
    job_ids = []
    for number in range(jobs):
        delivery = Delivery(
            source="shopify",
            topic="customers/create",
            delivery_id=f"bench-{number}",
            account="bench.myshopify.com",
            received_at="2026-12-04T00:00:00+00:00",
            event_at=None,
            event_id=None,
            body={**body, "email": f"customer{number}@example.com"},
        )
        stored = intake.store(
            queue,
            delivery,
            dedupe_ttl=3600,
            result_ttl=3600,
            failure_ttl=3600,
            job_timeout=28,
        )
        job_ids.append(stored.job_id)

    env = relay_env(
        redis_url,
        standin.base_url,
        LOG_LEVEL="WARNING",
        COPERNICA_MAX_RPS=max_rps,
        COPERNICA_MAX_CONCURRENCY="0",
    )
    rate, wall = _drain(connection, env, job_ids)

    # The same worker on jobs that do nothing, in the same run: RQ's own
    # bookkeeping ceiling on this machine right now.
    noop_ids = [
        queue.enqueue("worker.retry.parse_retry_after", None).id for _ in range(jobs)
    ]
    noop_rate, _ = _drain(connection, env, noop_ids)

    finished = FinishedJobRegistry(queue=queue).count
    return {
        "deliveries": jobs,
        "finished": finished,
        "puts_received": sum(r.method == "PUT" for r in standin.requests),
        "deliveries_per_second": rate,
        "noop_jobs_per_second": noop_rate,
        "ratio_to_noop": round(rate / noop_rate, 2),
        "wall_seconds_with_startup": wall,
    }


def _drain(connection, env, job_ids) -> tuple[float, float]:
    """Run one burst worker over the queued jobs; their rate and the wall time."""
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "worker", "--burst"],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.monotonic() - started
    first = Job.fetch(job_ids[0], connection=connection, serializer=JSONSerializer)
    last = Job.fetch(job_ids[-1], connection=connection, serializer=JSONSerializer)
    busy = (last.ended_at - first.started_at).total_seconds()
    return round(len(job_ids) / busy, 1), round(wall, 2)


if __name__ == "__main__":
    main()
