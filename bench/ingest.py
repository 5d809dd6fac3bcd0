"""Ingest: signed Shopify deliveries posted to the relay, beside a no-op endpoint.

Starts an embedded Redis, the relay's web process and a no-op Flask endpoint
(bench/noop.py: reads the body, answers 202), both under the repository's
gunicorn.conf.py with the same settings. Then drives each in turn with the
same load: wrk (a Lua script gives every request a new X-Shopify-Webhook-Id;
the body and its signature stay the same) or, without wrk, a bounded Python
load generator. The two alternate for ``--rounds`` rounds so a burst of noise
on a shared machine hits both. Prints requests per second and latency
percentiles of each, the relay's share of the no-op rate (target >= 0.60),
the relay's p99 (target <= 25 ms), and checks that every 202 left a job.

    .venv/bin/python -m bench.ingest [--seconds 10] [--connections 16]
    .venv/bin/python -m bench.ingest --smoke     # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import redis

from app.signatures import sign
from bench.common import children, cpu_seconds, percentile, record, start_gunicorn
from tests.harness import FIXTURES, SHOPIFY_SECRET, relay_env
from tools.embedded_redis import RedisServer

BODY = (FIXTURES / "shopify" / "customers_create.json").read_bytes()
SIGNATURE = sign(SHOPIFY_SECRET.encode(), BODY)

TARGET_RATIO = 0.60
TARGET_P99_MS = 25.0

WRK_SCRIPT = """
local body = [==[%(body)s]==]
local counter = 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function request()
  counter = counter + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["X-Shopify-Topic"] = "customers/create",
    ["X-Shopify-Hmac-Sha256"] = "%(signature)s",
    ["X-Shopify-Shop-Domain"] = "bench.myshopify.com",
    ["X-Shopify-Webhook-Id"] = "%(run)s-" .. tid .. "-" .. counter,
  }
  return wrk.format("POST", "/webhooks/shopify", headers, body)
end
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="no-op, relay, ...")
    parser.add_argument("--web-concurrency", default="2")
    parser.add_argument("--web-threads", default="32", help="as gunicorn.conf.py")
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="the relay's LOG_LEVEL (default INFO, its own default: one log "
        "line per webhook is part of its cost)",
    )
    parser.add_argument(
        "--python-load",
        action="store_true",
        help="use the Python load generator even if wrk exists",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="1 round of 1 s each: it runs, for CI"
    )
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.rounds = 1, 1

    tool = "wrk" if shutil.which("wrk") and not args.python_load else "python"
    with tempfile.TemporaryDirectory() as scratch:
        figures = measure(Path(scratch), args, tool)

    record(
        "ingest",
        {
            "tool": tool,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "connections": args.connections,
            "web_concurrency": args.web_concurrency,
            "web_threads": args.web_threads,
            "log_level": args.log_level,
            "body_bytes": len(BODY),
            "smoke": args.smoke,
        },
        figures,
    )
    print(
        f"relay {figures['relay']['requests_per_second']} req/s, no-op "
        f"{figures['noop']['requests_per_second']} req/s: ratio "
        f"{figures['ratio_to_noop']} (target >= {TARGET_RATIO}); relay p99 "
        f"{figures['relay']['p99_ms']} ms at {args.connections} connections "
        f"(target <= {TARGET_P99_MS:g} ms); "
        f"jobs in Redis {figures['jobs_in_redis']} for "
        f"{figures['relay']['accepted']} accepted"
    )


def measure(scratch: Path, args, tool: str) -> dict:
    server = RedisServer(scratch / "redis", unix_socket=False)
    server.start()
    started = []
    try:
        env = relay_env(
            server.url,
            None,
            WEB_CONCURRENCY=args.web_concurrency,
            WEB_THREADS=args.web_threads,
            LOG_LEVEL=args.log_level,
        )
        relay, relay_url = start_gunicorn("app:create_app()", env, scratch / "r.log")
        started.append(relay)
        noop, noop_url = start_gunicorn(
            "bench.noop:create_app()", env, scratch / "noop.log"
        )
        started.append(noop)

        runs = {"noop": [], "relay": []}
        endpoints = (("noop", noop_url, noop), ("relay", relay_url, relay))
        for round_number in range(args.rounds):
            for name, url, web in endpoints:
                run_id = f"bench-{round_number}-{name}"
                pids = {
                    "web": [web.process.pid, *children(web.process.pid)],
                    "redis": [server.process.pid],
                }
                used = CpuUse(pids)
                if tool == "wrk":
                    figures = run_wrk(url, args, scratch, run_id)
                else:
                    figures = run_python(url, args, run_id)
                figures["cpu_seconds"] = used.since()
                runs[name].append(figures)

        connection = redis.Redis.from_url(server.url)
        jobs = connection.llen("rq:queue:deliveries")
        connection.close()
    finally:
        for process in started:
            process.stop()
        server.stop()

    noop_figures, relay_figures = _combine(runs["noop"]), _combine(runs["relay"])
    ratio = relay_figures["requests_per_second"] / noop_figures["requests_per_second"]
    return {
        "relay": relay_figures,
        "noop": noop_figures,
        "ratio_to_noop": round(ratio, 2),
        "ratio_target": TARGET_RATIO,
        "p99_ms_target": TARGET_P99_MS,
        "jobs_in_redis": jobs,
        "rounds": runs,
    }


def _combine(runs: list[dict]) -> dict:
    """All rounds of one endpoint: total rate, worst round's percentiles."""
    seconds = sum(run["seconds"] for run in runs)
    return {
        "requests": sum(run["requests"] for run in runs),
        "accepted": sum(run["accepted"] for run in runs),
        "requests_per_second": round(sum(run["requests"] for run in runs) / seconds, 1),
        **{
            f"p{share}_ms": max(run[f"p{share}_ms"] for run in runs)
            for share in (50, 90, 99)
        },
        "errors": sum(run["errors"] for run in runs),
        # Where the machine's time went, per request: the gunicorn processes,
        # Redis, and the load tool (wrk, or this process for the Python one).
        "cpu_us_per_request": {
            part: round(
                sum(run["cpu_seconds"][part] for run in runs)
                / sum(run["requests"] for run in runs)
                * 1e6
            )
            for part in runs[0]["cpu_seconds"]
        },
    }


class CpuUse:
    """CPU time used from now on by some processes, and by the load tool."""

    def __init__(self, pids: dict[str, list[int]]):
        self.pids = pids
        self.start = {part: self._processes(part) for part in pids}
        self.start_tool = self._tool()

    def since(self) -> dict[str, float]:
        used = {part: self._processes(part) - self.start[part] for part in self.pids}
        used["load_tool"] = self._tool() - self.start_tool
        return {part: round(seconds, 2) for part, seconds in used.items()}

    def _processes(self, part: str) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids[part])

    @staticmethod
    def _tool() -> float:
        # wrk is a child that has ended; the Python load runs in this process.
        ended = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ended.ru_utime + ended.ru_stime + time.process_time()


def run_wrk(url: str, args, scratch: Path, run_id: str) -> dict:
    script = scratch / f"{run_id}.lua"
    script.write_text(
        WRK_SCRIPT % {"body": BODY.decode(), "signature": SIGNATURE, "run": run_id}
    )
    threads = min(2, args.connections)
    output = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{args.connections}",
            f"-d{args.seconds}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=args.seconds + 30,
    ).stdout
    took = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)\b", output)
    requests = int(took.group(1))
    seconds = float(took.group(2)) * {"ms": 0.001, "s": 1, "m": 60}[took.group(3)]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    figures = {
        "requests": requests,
        "seconds": round(seconds, 2),
        "requests_per_second": round(requests / seconds, 1),
        "accepted": requests - (int(non_2xx.group(1)) if non_2xx else 0),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(int(n) for n in re.findall(r"\d+", errors.group(1))) if errors else 0),
    }
    for share in ("50", "90", "99"):
        found = re.search(rf"^\s+{share}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        value, unit = float(found.group(1)), found.group(2)
        figures[f"p{share}_ms"] = round(
            value * {"us": 0.001, "ms": 1, "s": 1000}[unit], 2
        )
    return figures


def run_python(url: str, args, run_id: str) -> dict:
    """A bounded load generator: one thread and one kept-alive connection each."""
    deadline = time.monotonic() + args.seconds
    latencies: list[float] = []
    failures = []
    lock = threading.Lock()
    port = int(url.rsplit(":", 1)[1])

    def client(number: int) -> None:
        connection = HTTPConnection("127.0.0.1", port, timeout=10)
        sent = 0
        while time.monotonic() < deadline:
            sent += 1
            headers = {
                "Content-Type": "application/json",
                "X-Shopify-Topic": "customers/create",
                "X-Shopify-Hmac-Sha256": SIGNATURE,
                "X-Shopify-Shop-Domain": "bench.myshopify.com",
                "X-Shopify-Webhook-Id": f"{run_id}-{number}-{sent}",
            }
            started = time.perf_counter()
            connection.request("POST", "/webhooks/shopify", BODY, headers)
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed * 1000)
                if response.status != 202:
                    failures.append(response.status)
        connection.close()

    threads = [
        threading.Thread(target=client, args=(n,)) for n in range(args.connections)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "accepted": len(latencies) - len(failures),
        "errors": len(failures),
        **{
            f"p{share}_ms": round(percentile(latencies, share / 100), 2)
            for share in (50, 90, 99)
        },
    }


if __name__ == "__main__":
    main()
