"""Memory: the processes after 10,000, 20,000 and 30,000 events, and Redis per event.

Starts an embedded Redis, the Copernica stand-in (in this process, answering
at once), the relay's web process (one gunicorn worker, so it sees every
event) and one worker process. Sends signed Shopify webhooks, each for its own
customer, in steps of ``--step`` events, lets the worker deliver each step,
and then reads the resident memory (RSS) of the gunicorn worker and of the
worker process. Targets: at most 80 MB each, and no growth between the second
and the third step.

Then, with the worker stopped, it queues ``--queued`` more events and reads
Redis's own accounting (MEMORY USAGE) of what one queued event holds: the job
hash, the dedupe key and its entry in the queue list (target: at most the
payload plus 1 KB), and what a delivered event leaves behind: its dedupe key
(kept RELAY_DEDUPE_TTL) and its finished job (kept RELAY_RESULT_TTL).

    .venv/bin/python -m bench.memory [--step 10000] [--queued 1000]
    .venv/bin/python -m bench.memory --smoke     # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import redis

from app.intake import DEDUPE_PREFIX
from app.signatures import sign
from bench.common import children, record, rss_mb
from tests.harness import (
    COPERNICA_TOKEN,
    DATABASE_FIELDS,
    FIXTURES,
    SHOPIFY_SECRET,
    Relay,
    relay_env,
)
from tests.standin.copernica import CopernicaStandIn
from tools.embedded_redis import RedisServer

TARGET_RSS_MB = 80
TARGET_EXTRA_BYTES_PER_EVENT = 1024
STEPS = 3

#: Payloads whose queued events Redis's accounting is read for: the smallest
#: is the hardest case for "payload + 1 KB", since RQ compresses the body.
PAYLOADS = {
    "shopify/customers_create.json": "customers/create",
    "shopify/customers_update.json": "customers/update",
    "shopify/orders_create.json": "orders/create",
}
QUEUE = "rq:queue:deliveries"

BODY = json.loads((FIXTURES / "shopify" / "customers_create.json").read_bytes())

#: Sender threads: the web process is kept busy, as under real load.
SENDERS = 8

#: Longest wait for the worker to deliver one step.
DRAIN_SECONDS = 600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=10_000, help="events per step")
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument(
        "--smoke", action="store_true", help="steps of 100 events: it runs, for CI"
    )
    args = parser.parse_args()
    if args.smoke:
        args.step, args.queued = 100, 100

    with tempfile.TemporaryDirectory() as scratch:
        figures = measure(Path(scratch), args)

    record(
        "memory",
        {
            "events_per_step": args.step,
            "steps": STEPS,
            "queued_sample": args.queued,
            "web_concurrency": 1,
            "worker_processes": 1,
            "smoke": args.smoke,
        },
        figures,
    )
    web = figures["web_worker_rss_mb"]
    worker = figures["worker_rss_mb"]
    queued = figures["redis_bytes_per_queued_event"]
    per_payload = ", ".join(
        f"{item['total']} B for {item['payload']} B" for item in queued.values()
    )
    print(
        f"RSS after {', '.join(str(args.step * n) for n in range(1, STEPS + 1))} "
        f"events: gunicorn worker {web} MB, worker {worker} MB "
        f"(target <= {TARGET_RSS_MB} MB, no growth from step 2 to 3); Redis per "
        f"queued event {per_payload} of payload (target <= payload + "
        f"{TARGET_EXTRA_BYTES_PER_EVENT} B); per dedupe key "
        f"{figures['redis_bytes_per_dedupe_key']} B"
    )


def measure(scratch: Path, args) -> dict:
    with CopernicaStandIn(
        access_token=COPERNICA_TOKEN,
        databases={1234: DATABASE_FIELDS},
        put_status=303,
    ) as standin:
        server = RedisServer(scratch / "redis", unix_socket=False)
        server.start()
        relay = Relay(
            env=relay_env(
                server.url,
                standin.base_url,
                WEB_CONCURRENCY="1",
                COPERNICA_MAX_RPS="0",
                COPERNICA_MAX_CONCURRENCY="0",
                LOG_LEVEL="WARNING",
            ),
            log_dir=scratch,
        )
        connection = redis.Redis.from_url(server.url)
        try:
            relay.start_web()
            worker = relay.start_worker()
            [web_worker] = children(relay.web.process.pid)
            figures: dict = {"web_worker_rss_mb": [], "worker_rss_mb": []}
            for step in range(STEPS):
                send(relay, range(step * args.step, (step + 1) * args.step))
                _wait_until_delivered(connection, standin, args.step)
                standin.clear()
                figures["web_worker_rss_mb"].append(rss_mb(web_worker))
                figures["worker_rss_mb"].append(rss_mb(worker.process.pid))
            figures["web_master_rss_mb"] = rss_mb(relay.web.process.pid)

            worker.stop()
            figures.update(redis_per_event(relay, connection, args))
        finally:
            connection.close()
            relay.stop()
            server.stop()

    for name in ("web_worker_rss_mb", "worker_rss_mb"):
        values = figures[name]
        figures[name.replace("rss_mb", "growth_step_2_to_3_mb")] = round(
            values[-1] - values[-2], 1
        )
    figures["rss_target_mb"] = TARGET_RSS_MB
    return figures


def send(
    relay: Relay,
    numbers: range,
    prefix: str = "mem",
    fixed: tuple[str, bytes] | None = None,
) -> list[str]:
    """Post one webhook per number, from a few threads; the job ids accepted.

    Each is a customers/create for its own customer, or the ``fixed`` topic
    and body under its own delivery id.
    """
    port = int(relay.url.rsplit(":", 1)[1])
    pending = iter(numbers)
    lock = threading.Lock()
    jobs: list[str] = []
    refused = []

    def sender() -> None:
        connection = HTTPConnection("127.0.0.1", port, timeout=10)
        while True:
            with lock:
                number = next(pending, None)
            if number is None:
                break
            if fixed:
                topic, body = fixed
            else:
                topic = "customers/create"
                email = f"{prefix}-{number}@example.com"
                body = json.dumps({**BODY, "email": email}).encode()
            connection.request(
                "POST",
                "/webhooks/shopify",
                body,
                {
                    "Content-Type": "application/json",
                    "X-Shopify-Topic": topic,
                    "X-Shopify-Hmac-Sha256": sign(SHOPIFY_SECRET.encode(), body),
                    "X-Shopify-Shop-Domain": "bench.myshopify.com",
                    "X-Shopify-Webhook-Id": f"{prefix}-{number}",
                },
            )
            response = connection.getresponse()
            answer = response.read()
            with lock:
                if response.status == 202:
                    jobs.append(json.loads(answer)["job"])
                else:
                    refused.append(response.status)
        connection.close()

    threads = [threading.Thread(target=sender) for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if refused:
        raise RuntimeError(f"{len(refused)} webhooks refused: {set(refused)}")
    return jobs


def _wait_until_delivered(connection, standin: CopernicaStandIn, count: int) -> None:
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        puts = sum(r.method == "PUT" for r in standin.requests)
        if puts >= count and connection.llen(QUEUE) == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the worker did not deliver {count} events in time")


def redis_per_event(relay: Relay, connection: redis.Redis, args) -> dict:
    """What Redis holds per queued event, by its own MEMORY USAGE."""
    # A delivered event leaves its dedupe key and its finished job behind.
    dedupe_keys = list(connection.scan_iter(f"{DEDUPE_PREFIX}*", count=1000))[:100]
    per_dedupe_key = _average_usage(connection, dedupe_keys)
    finished = [
        job_id.decode() for job_id in connection.zrange("rq:finished:deliveries", 0, 99)
    ]
    per_finished_job = _average_usage(connection, [f"rq:job:{j}" for j in finished])
    result_keys = [f"rq:results:{j}" for j in finished]
    per_result = _average_usage(connection, result_keys)

    queued = {
        fixture: _queued_event(relay, connection, fixture, topic, args.queued)
        for fixture, topic in PAYLOADS.items()
    }
    for figures in queued.values():
        figures["dedupe_key"] = per_dedupe_key
        figures["total"] = round(
            figures["job_hash"] + per_dedupe_key + figures["queue_entry"]
        )
        figures["over_payload"] = figures["total"] - figures["payload"]
    return {
        "redis_bytes_per_queued_event": queued,
        "redis_bytes_per_dedupe_key": per_dedupe_key,
        "redis_bytes_per_finished_job": {
            "job_hash": per_finished_job,
            "result": per_result,
            "kept_seconds": 3600,
        },
        "redis_target_over_payload": TARGET_EXTRA_BYTES_PER_EVENT,
    }


def _queued_event(
    relay: Relay, connection: redis.Redis, fixture: str, topic: str, count: int
) -> dict:
    body = (FIXTURES / fixture).read_bytes()
    list_before = _usage(connection, QUEUE)
    used_before = _used_memory(connection)
    jobs = send(relay, range(count), prefix=fixture, fixed=(topic, body))
    used_after = _used_memory(connection)
    list_after = _usage(connection, QUEUE)
    return {
        "payload": len(body),
        "job_hash": _average_usage(connection, [f"rq:job:{j}" for j in jobs[:100]]),
        "queue_entry": round((list_after - list_before) / len(jobs), 1),
        # Redis's whole used_memory, divided: the keys' table entries too.
        "used_memory_growth": round((used_after - used_before) / len(jobs)),
        # RQ's compressed "data" field is longer than a compact hash may hold
        # (hash-max-ziplist-value, 64 B by default), so Redis keeps each job
        # as a full hash table. The same hash, compact:
        "job_hash_if_compact": _compact_hash_usage(connection, f"rq:job:{jobs[0]}"),
    }


def _compact_hash_usage(connection: redis.Redis, key: str) -> int:
    """MEMORY USAGE of a copy of hash ``key`` stored in Redis's compact form."""
    setting = "hash-max-ziplist-value"
    before = connection.config_get(setting)[setting]
    copy = f"{key}:compact-copy"
    try:
        connection.config_set(setting, 4096)
        connection.hset(copy, mapping=connection.hgetall(key))
        return _usage(connection, copy)
    finally:
        connection.delete(copy)
        connection.config_set(setting, before)


def _used_memory(connection: redis.Redis) -> int:
    # Less the append-only file's buffer and the clients' buffers, which
    # hold commands in passing, not data.
    memory = connection.info("memory")
    return (
        memory["used_memory"]
        - memory.get("mem_aof_buffer", 0)
        - memory.get("mem_clients_normal", 0)
    )


def _usage(connection: redis.Redis, key: str) -> int:
    return connection.memory_usage(key, samples=0) or 0


def _average_usage(connection: redis.Redis, keys: list) -> float:
    if not keys:
        return 0.0
    return round(sum(_usage(connection, key) for key in keys) / len(keys), 1)


if __name__ == "__main__":
    main()
