"""Latency-bound delivery: N worker processes against a stand-in that takes 100 ms.

Copernica answers in about 100 ms, so one worker, doing one call at a time,
can deliver at most 10 events a second; N workers at most N / 0.1 s. For each
N (1, 2, 4, 8 by default) the benchmark starts N ``python -m worker``
processes, waits until all have registered with RQ, queues N x --per-worker
deliveries (each for another customer, so no two wait for one profile's
lock), and counts from the first job's start to the last job's end. It reads
the resident memory (VmRSS, from /proc) of every worker process and its
children (RQ's scheduler) while they work and reports the largest seen.

The relay's own limits toward Copernica (20 calls a second, 8 in flight)
would cap 8 workers well below 80 a second; the run raises them, above what
8 workers can reach, and prints them.

    .venv/bin/python -m bench.latency [--workers 1,2,4,8] [--per-worker 100]
    .venv/bin/python -m bench.latency --smoke     # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from rq import Queue, Worker
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from bench.common import ROOT, record
from bench.workers import jobs_per_second, queue_deliveries
from tests.harness import COPERNICA_TOKEN, DATABASE_FIELDS, relay_env
from tests.standin.copernica import CopernicaStandIn, Fault
from tools.embedded_redis import RedisServer

#: Every profile PUT waits this long at the stand-in.
ANSWER_SECONDS = 0.1

#: Share of N / ANSWER_SECONDS that N workers should reach.
TARGET = 0.85

#: Longest wait for workers to start, or for a round's jobs to finish.
WAIT_SECONDS = 120


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument(
        "--per-worker",
        type=int,
        default=100,
        help="deliveries per worker: with few, a worker that ends up with one "
        "or two more than the others stretches the run by a few per cent",
    )
    parser.add_argument("--max-rps", default="200")
    parser.add_argument("--max-concurrency", default="16")
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds: 1 and 2 workers"
    )
    args = parser.parse_args()
    if args.smoke:
        args.workers, args.per_worker = "1,2", 5
    counts = [int(n) for n in args.workers.split(",")]
    rounds = sum(counts) * args.per_worker

    with (
        tempfile.TemporaryDirectory() as scratch,
        CopernicaStandIn(
            access_token=COPERNICA_TOKEN,
            databases={1234: DATABASE_FIELDS},
            put_status=303,
        ) as standin,
    ):
        # Only the profile PUTs are slow; the field list is read once anyway.
        standin.add_fault(
            Fault(status=None, delay=ANSWER_SECONDS, method="PUT", times=rounds)
        )
        server = RedisServer(Path(scratch) / "redis", unix_socket=False)
        server.start()
        try:
            env = relay_env(
                server.url,
                standin.base_url,
                LOG_LEVEL="WARNING",
                COPERNICA_MAX_RPS=args.max_rps,
                COPERNICA_MAX_CONCURRENCY=args.max_concurrency,
            )
            results = [
                measure(server.url, env, workers, args.per_worker, Path(scratch))
                for workers in counts
            ]
        finally:
            server.stop()

    record(
        "latency",
        {
            "standin_answer_seconds": ANSWER_SECONDS,
            "workers": counts,
            "deliveries_per_worker": args.per_worker,
            "copernica_max_rps": args.max_rps,
            "copernica_max_concurrency": args.max_concurrency,
            "log_level": "WARNING",
            "worker": "python -m worker (RelayWorker, SimpleWorker), with scheduler",
            "smoke": args.smoke,
        },
        {"target_share_of_n_per_0_1_s": TARGET, "runs": results},
    )
    for run in results:
        print(
            f"{run['workers']} worker(s): {run['deliveries_per_second']} "
            f"deliveries/s, {run['share_of_ceiling']} of N / 0.1 s (target >= "
            f"{TARGET}); RSS of all processes {run['rss_mb_all_processes']} MB"
        )


def measure(redis_url: str, env: dict, workers: int, per_worker: int, scratch: Path):
    connection = redis.Redis.from_url(redis_url)
    queue = Queue("deliveries", connection=connection, serializer=JSONSerializer)
    finished = FinishedJobRegistry(queue=queue)
    done_before = finished.count
    processes = []
    try:
        for number in range(workers):
            log = open(scratch / f"worker-{workers}-{number}.log", "wb")
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker"],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        _wait(lambda: Worker.count(queue=queue) >= workers, processes)

        count = workers * per_worker
        job_ids = queue_deliveries(queue, count, count, f"latency-{workers}")
        peak_rss: dict[int, int] = {}
        _wait(
            lambda: finished.count - done_before >= count,
            processes,
            each_poll=lambda: _sample_rss(processes, peak_rss),
        )
        rate = jobs_per_second(connection, job_ids)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    ceiling = workers / ANSWER_SECONDS
    return {
        "workers": workers,
        "deliveries": count,
        "deliveries_per_second": rate,
        "ceiling_per_second": ceiling,
        "share_of_ceiling": round(rate / ceiling, 2),
        "meets_target": rate >= TARGET * ceiling,
        "rss_mb_per_process": sorted(round(kb / 1024, 1) for kb in peak_rss.values()),
        "rss_mb_all_processes": round(sum(peak_rss.values()) / 1024, 1),
    }


def _wait(condition, processes, each_poll=None) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if each_poll:
            each_poll()
        if any(process.poll() is not None for process in processes):
            raise SystemExit("a worker exited early; see its log")
        if time.monotonic() > deadline:
            raise SystemExit(f"not done within {WAIT_SECONDS} s")
        time.sleep(0.1)


def _sample_rss(processes, peak: dict[int, int]) -> None:
    """Largest VmRSS (kB) seen per worker process and per child it started."""
    pids = {process.pid for process in processes}
    pids |= {pid for pid in _children(pids)}
    for pid in pids:
        rss = _rss_kb(pid)
        if rss is not None:
            peak[pid] = max(peak.get(pid, 0), rss)


def _children(parents: set[int]) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The parent pid is the second field after the parenthesised name.
        if int(stat.rsplit(")", 1)[1].split()[1]) in parents:
            children.append(int(entry))
    return children


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


if __name__ == "__main__":
    main()
