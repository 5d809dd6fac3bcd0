"""Delivery: how many queued deliveries one worker process applies per second.

Queues N Shopify customer deliveries (through the same intake code as the web
process), then runs one ``python -m worker --burst`` against the Copernica
stand-in, which answers at once. In the same run, for the ratios:

- the same worker drains N jobs that do nothing (RQ's bookkeeping alone),
  and N that do nothing with a delivery record as their argument (RQ's
  bookkeeping for a job that carries as much data as a delivery);
- plain RQ SimpleWorker drains N of them too (what the relay's worker class
  adds to every job);
- RQ's default forking ``Worker`` drains a smaller number of deliveries (it
  forks a process per job, so a few hundred take long enough).

Deliveries and no-op jobs take turns in a few rounds (the figures are the
medians), so a neighbour loading the machine for a while weighs on both.
Rates are counted from the first job's start to the last job's end, so process
start-up is left out. The deliveries go to a fixed set of customers in turn
(each profile is created once, then updated): the stand-in finds a profile by
scanning all of them, so a new customer per delivery would measure the
stand-in slowing down, not the relay. Redis commands per job come from INFO
commandstats before and after each run.

    .venv/bin/python -m bench.delivery [--jobs 2000] [--profile out.prof]
    .venv/bin/python -m bench.delivery --smoke     # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import redis
from rq import Queue
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from bench.common import record
from bench.workers import (
    drain,
    jobs_per_second,
    queue_deliveries,
    queue_noops,
    redis_commands,
)
from tests.harness import COPERNICA_TOKEN, DATABASE_FIELDS, relay_env
from tests.standin.copernica import CopernicaStandIn
from tools.embedded_redis import RedisServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument(
        "--forking-jobs",
        type=int,
        default=200,
        help="deliveries for RQ's forking Worker (about 12 a second)",
    )
    parser.add_argument("--customers", type=int, default=100)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="deliveries and no-op jobs take turns in this many rounds; the "
        "figures are the rounds' medians",
    )
    parser.add_argument(
        "--max-rps",
        default="0",
        help="COPERNICA_MAX_RPS for the run (0, the default here: no limit, to "
        "measure the relay itself; the relay's own default is 20)",
    )
    parser.add_argument(
        "--max-concurrency",
        default="0",
        help="COPERNICA_MAX_CONCURRENCY for the run (0: no limit; the relay's "
        "own default is 8)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the relay worker's deliveries under cProfile, into this file",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds: 60 jobs, 10 forked"
    )
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.forking_jobs, args.customers, args.rounds = 60, 10, 10, 1

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
            env = relay_env(
                server.url,
                standin.base_url,
                LOG_LEVEL="WARNING",
                COPERNICA_MAX_RPS=args.max_rps,
                COPERNICA_MAX_CONCURRENCY=args.max_concurrency,
            )
            figures = measure(server.url, env, args)
            figures["puts_received"] = sum(r.method == "PUT" for r in standin.requests)
        finally:
            server.stop()

    record(
        "delivery",
        {
            "jobs": args.jobs,
            "rounds": args.rounds,
            "forking_jobs": args.forking_jobs,
            "customers": args.customers,
            "copernica_max_rps": args.max_rps,
            "copernica_max_concurrency": args.max_concurrency,
            "log_level": "WARNING",
            "worker": "RelayWorker (SimpleWorker), 1 process",
            "standin": "answers at once",
            "smoke": args.smoke,
            "profiled": args.profile is not None,
        },
        figures,
    )
    print(
        f"{figures['deliveries_per_second']} deliveries/s against "
        f"{figures['noop_jobs_per_second']} no-op jobs/s: ratio "
        f"{figures['ratio_to_noop']} (target >= 0.8); forking Worker "
        f"{figures['forking_worker_deliveries_per_second']}/s: "
        f"{figures['ratio_to_forking_worker']}x (target >= 10)"
    )


def measure(redis_url: str, env: dict, args) -> dict:
    connection = redis.Redis.from_url(redis_url)
    queue = Queue("deliveries", connection=connection, serializer=JSONSerializer)
    timeout = 60 + args.jobs  # far above any plausible run: a hang stops here
    per_round = max(1, args.jobs // args.rounds)

    def run(kind: str, job_ids: list[str], profile=None) -> tuple[float, float, float]:
        before = redis_commands(connection)
        wall = drain(kind, env, timeout, profile)
        commands = (redis_commands(connection) - before) / len(job_ids)
        return jobs_per_second(connection, job_ids), round(commands, 1), wall

    # Rounds take turns, so a neighbour loading the shared machine for a while
    # weighs on the deliveries and on the no-op jobs alike.
    rounds = []
    for number in range(args.rounds):
        profile = None
        if args.profile is not None and number == 0:
            profile = args.profile
        deliveries = queue_deliveries(
            queue, per_round, args.customers, f"bench-{number}"
        )
        rate, commands, wall = run("relay", deliveries, profile)
        noop_rate, noop_commands, _ = run("relay", queue_noops(queue, per_round))
        carrying = queue_noops(queue, per_round, with_record=True)
        carrying_rate, _, _ = run("relay", carrying)
        simple_rate, _, _ = run("simple", queue_noops(queue, per_round))
        rounds.append(
            {
                "deliveries_per_second": rate,
                "noop_jobs_per_second": noop_rate,
                "ratio_to_noop": round(rate / noop_rate, 2),
                "noop_with_record_jobs_per_second": carrying_rate,
                "ratio_to_noop_with_record": round(rate / carrying_rate, 2),
                "simpleworker_noop_jobs_per_second": simple_rate,
                "redis_commands_per_delivery": commands,
                "redis_commands_per_noop_job": noop_commands,
                "wall_seconds_with_startup": wall,
            }
        )

    forked = queue_deliveries(queue, args.forking_jobs, args.customers, "forking")
    forking_rate, _, _ = run("forking", forked)

    def middle(name: str) -> float:
        return statistics.median(entry[name] for entry in rounds)

    rate = middle("deliveries_per_second")
    return {
        "deliveries": per_round * args.rounds,
        "finished": FinishedJobRegistry(queue=queue).count,
        "deliveries_per_second": rate,
        "noop_jobs_per_second": middle("noop_jobs_per_second"),
        "ratio_to_noop": middle("ratio_to_noop"),
        "noop_with_record_jobs_per_second": middle("noop_with_record_jobs_per_second"),
        "ratio_to_noop_with_record": middle("ratio_to_noop_with_record"),
        "simpleworker_noop_jobs_per_second": middle(
            "simpleworker_noop_jobs_per_second"
        ),
        "forking_worker_deliveries_per_second": forking_rate,
        "ratio_to_forking_worker": round(rate / forking_rate, 1),
        "redis_commands_per_delivery": middle("redis_commands_per_delivery"),
        "redis_commands_per_noop_job": middle("redis_commands_per_noop_job"),
        "rounds": rounds,
    }


if __name__ == "__main__":
    main()
