"""Ingest: signed Shopify deliveries with unique ids posted to the relay.

Starts an embedded Redis and the web process under the repository's gunicorn
configuration, then drives it with wrk (a Lua script gives every request a new
X-Shopify-Webhook-Id; the body and its signature stay the same) or, without
wrk, with a bounded Python load generator. Prints requests per second and the
latency percentiles, and checks that every 202 left exactly one job in Redis.

    .venv/bin/python -m bench.ingest [--seconds 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import redis

from app.signatures import sign
from bench.common import record
from tests.harness import FIXTURES, SHOPIFY_SECRET, Relay, relay_env
from tools.embedded_redis import RedisServer

BODY = (FIXTURES / "shopify" / "customers_create.json").read_bytes()
SIGNATURE = sign(SHOPIFY_SECRET.encode(), BODY)

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
    ["X-Shopify-Webhook-Id"] = "bench-" .. tid .. "-" .. counter,
  }
  return wrk.format("POST", "/webhooks/shopify", headers, body)
end
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--web-concurrency", default="2")
    parser.add_argument(
        "--python-load",
        action="store_true",
        help="use the Python load generator even if wrk exists",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        server = RedisServer(scratch / "redis", unix_socket=False)
        server.start()
        relay = Relay(
            env=relay_env(
                server.url,
                None,
                WEB_CONCURRENCY=args.web_concurrency,
                LOG_LEVEL="WARNING",
            ),
            log_dir=scratch,
        )
        relay.start_web()
        try:
            if shutil.which("wrk") and not args.python_load:
                tool, figures = "wrk", run_wrk(relay, args, scratch)
            else:
                tool, figures = "python", run_python(relay, args)
            connection = redis.Redis.from_url(server.url)
            figures["jobs_in_redis"] = connection.llen("rq:queue:deliveries")
        finally:
            relay.stop()
            server.stop()

    record(
        "ingest",
        {
            "tool": tool,
            "seconds": args.seconds,
            "connections": args.connections,
            "web_concurrency": args.web_concurrency,
            "body_bytes": len(BODY),
        },
        figures,
    )


def run_wrk(relay: Relay, args, scratch: Path) -> dict:
    script = scratch / "ingest.lua"
    script.write_text(WRK_SCRIPT % {"body": BODY.decode(), "signature": SIGNATURE})
    threads = min(2, args.connections)
    output = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{args.connections}",
            f"-d{args.seconds}s",
            "--latency",
            "-s",
            str(script),
            relay.url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures = {
        "requests_per_second": float(
            re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)
        )
    }
    for percentile in ("50", "90", "99"):
        found = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        value, unit = float(found.group(1)), found.group(2)
        figures[f"p{percentile}_ms"] = value * {"us": 0.001, "ms": 1, "s": 1000}[unit]
    completed = re.search(r"(\d+) requests in", output)
    figures["requests"] = int(completed.group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    figures["non_2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    return figures


def run_python(relay: Relay, args) -> dict:
    """A bounded load generator: one thread and one kept-alive connection each."""
    deadline = time.monotonic() + args.seconds
    latencies: list[float] = []
    failures = []
    lock = threading.Lock()
    port = int(relay.url.rsplit(":", 1)[1])

    def client(number: int) -> None:
        connection = HTTPConnection("127.0.0.1", port, timeout=10)
        sent = 0
        while time.monotonic() < deadline:
            sent += 1
            headers = {
                "Content-Type": "application/json",
                "X-Shopify-Topic": "customers/create",
                "X-Shopify-Hmac-Sha256": SIGNATURE,
                "X-Shopify-Webhook-Id": f"bench-{number}-{sent}",
            }
            started = time.perf_counter()
            connection.request("POST", "/webhooks/shopify", BODY, headers)
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                if response.status != 202:
                    failures.append(response.status)

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

    def percentile(share: float) -> float:
        return round(
            latencies[min(len(latencies) - 1, int(len(latencies) * share))] * 1000, 2
        )

    return {
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": percentile(0.50),
        "p90_ms": percentile(0.90),
        "p99_ms": percentile(0.99),
        "non_2xx": len(failures),
    }


if __name__ == "__main__":
    main()
