"""``python -m worker``: run one delivery worker with RQ's scheduler.

The worker class builds on RQ's SimpleWorker, which runs jobs in its own
process. The default Worker forks a child per job, which costs more than a
delivery itself: about 12 jobs/s against about 230 jobs/s on two cores.
Delivery jobs hold no state between runs that a fork would protect, and a job
that hangs is still stopped by RQ's job timeout. On SIGTERM the worker
finishes the delivery in hand (at most RELAY_JOB_TIMEOUT, 28 s) and exits;
see worker/recovery.py for a worker that is killed instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from app.connections import (
    EvictionPolicyRefused,
    check_eviction_policy,
    connect_with,
    explain,
)
from app.logs import configure_logging
from app.metrics import RECORDER, known_topics
from app.settings import ConfigurationError
from worker.jobs import context
from worker.mapping import MappingError
from worker.recovery import RelayWorker

log = logging.getLogger("relay.worker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument(
        "--burst",
        action="store_true",
        help="deliver what is queued now, then exit (for draining and benchmarks)",
    )
    args = parser.parse_args(argv)
    configure_logging()
    try:
        ctx = context()
    except (ConfigurationError, MappingError) as error:
        sys.stderr.write(f"worker not started: {error}\n")
        return 2

    settings = ctx.settings
    connection = connect_with(settings)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    # Deliveries are counted in memory and added to Redis by a thread, where
    # GET /metrics reads them; the last counts go in when the worker exits.
    RECORDER.bind(connection, known_topics(ctx.rules))
    try:
        return _run(args, ctx, queue, connection)
    finally:
        RECORDER.flush()


def _run(args, ctx, queue, connection) -> int:
    settings = ctx.settings
    log.info(
        "worker starting",
        extra={"fields": {"rules": len(ctx.rules), **settings.describe()}},
    )
    if settings.dry_run:
        log.warning(
            "COPERNICA_ACCESS_TOKEN is not set: dry run, requests are logged "
            "and stored as job results, nothing is sent"
        )

    backoff = 1
    policy = None
    while True:
        worker = None
        started = time.monotonic()
        try:
            # No job is taken before Redis has shown it will not evict them;
            # a Redis away at start is waited for like one lost later.
            policy = policy or check_eviction_policy(
                connection, settings.allow_eviction
            )
            worker = _worker(queue, connection, settings.recovery_interval_seconds)
            worker.work(burst=args.burst, with_scheduler=True, logging_level=None)
        except EvictionPolicyRefused as refused:
            sys.stderr.write(f"worker not started: {refused}\n")
            return 2
        except redis.RedisError as error:
            # Raised while starting or tearing down, when Redis is away.
            log.warning(
                "worker lost Redis" if policy else "Redis not reachable at start",
                extra={"fields": {"error": explain(error)}},
            )
        if args.burst or (worker and worker._shutdown_requested_date is not None):
            return 0
        if time.monotonic() - started > BACKOFF_RESET_SECONDS:
            backoff = 1

        # RQ's loop gave up (Redis went away for longer than it waits, or an
        # error it does not handle): start a fresh worker, after a pause that
        # a stop signal cuts short.
        log.warning(
            "worker stopped unexpectedly; starting again",
            extra={"fields": {"retry_in_s": backoff}},
        )
        if _sleep_unless_stopped(backoff):
            return 0
        backoff = min(backoff * 2, MAX_RESTART_BACKOFF_SECONDS)


#: Longest pause between restarts of the worker loop when Redis is away.
MAX_RESTART_BACKOFF_SECONDS = 30

#: A loop that ran this long before it stopped starts again without delay.
BACKOFF_RESET_SECONDS = 60


def _worker(queue, connection, interval: int) -> RelayWorker:
    return RelayWorker(
        [queue],
        connection=connection,
        serializer=JSONSerializer,
        # Maintenance (which requeues abandoned deliveries) runs between jobs;
        # an idle worker wakes from its wait on the queue this often for it.
        maintenance_interval=interval,
        worker_ttl=interval + 15,
    )


def _sleep_unless_stopped(seconds: float) -> bool:
    """Sleep; True if SIGTERM or SIGINT came meanwhile."""
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.append(True))
    deadline = time.monotonic() + seconds
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(stopped)


if __name__ == "__main__":
    sys.exit(main())
