"""End to end: a steady stream of webhooks, from the relay's 2xx to Copernica's PUT.

Starts an embedded Redis, the Copernica stand-in (in this process, answering
at once), the relay's web process under gunicorn.conf.py and its worker
processes. Then sends signed Shopify customers/create webhooks at a steady
rate (paced, not a flood: each one leaves at its own moment), for a few
hundred customers in turn, each event newer than the last (so every one is
applied) and tagged in its first name, and measures for each the time from
the relay's 2xx answer reaching the sender to the stand-in receiving the PUT
with its tag. A few hundred customers rather than one per event: the
stand-in looks profiles up by scanning them all, and with 6,000 of them it,
not the relay, became the bottleneck. Targets at
100 events/s for 60 s: p50 <= 20 ms, p99 <= 100 ms, nothing lost.

The relay's default COPERNICA_MAX_RPS (20 calls/s) would throttle 100
events/s, so the run sets its own limit (``--max-rps``, off by default as in
bench.delivery, printed with the figures).

    .venv/bin/python -m bench.end_to_end [--rate 100] [--seconds 60]
    .venv/bin/python -m bench.end_to_end --smoke     # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.client import HTTPConnection
from pathlib import Path

import redis

from app.signatures import sign
from bench.common import percentile, record
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

TARGET_P50_MS = 20.0
TARGET_P99_MS = 100.0

BODY = json.loads((FIXTURES / "shopify" / "customers_create.json").read_bytes())

#: Sender threads: enough that a slow answer never delays the next event.
SENDERS = 8

#: Customers the events take turns on.
CUSTOMERS = 300

#: How long to wait for the last deliveries after the last event was sent.
DRAIN_SECONDS = 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100, help="events per second")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--max-rps",
        default="0",
        help="COPERNICA_MAX_RPS for the run (default 0: no limit, to measure the "
        "relay itself, as bench.delivery does; the relay's own default is 20, "
        "which would hold 100 events/s back)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 s at 20 events/s, 1 worker: it runs, for CI",
    )
    args = parser.parse_args()
    if args.smoke:
        args.rate, args.seconds, args.workers = 20, 1, 1

    with tempfile.TemporaryDirectory() as scratch:
        figures = measure(Path(scratch), args)

    record(
        "end_to_end",
        {
            "rate_per_second": args.rate,
            "seconds": args.seconds,
            "events": figures["sent"],
            "worker_processes": args.workers,
            "copernica_max_rps": args.max_rps,
            "standin": "answers at once",
            "smoke": args.smoke,
        },
        figures,
    )
    print(
        f"{figures['sent']} events at {args.rate:g}/s, COPERNICA_MAX_RPS="
        f"{args.max_rps}, {args.workers} worker(s): 2xx to PUT p50 "
        f"{figures['p50_ms']} ms (target <= {TARGET_P50_MS:g}), p99 "
        f"{figures['p99_ms']} ms (target <= {TARGET_P99_MS:g}); undelivered "
        f"{figures['undelivered']} (still queued {figures['still_queued']}, "
        f"failed {figures['failed']})"
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
                COPERNICA_MAX_RPS=args.max_rps,
                RELAY_RECOVERY_INTERVAL="10",
            ),
            log_dir=scratch,
        )
        try:
            relay.start_web()
            for _ in range(args.workers):
                relay.start_worker()
            _warm_up(relay, standin)
            sent = send_paced(relay, args.rate, args.seconds)
            arrivals = _wait_for_puts(standin, sent)
            connection = redis.Redis.from_url(server.url)
            backlog = {
                "still_queued": connection.llen("rq:queue:deliveries"),
                "failed": connection.zcard("rq:failed:deliveries"),
            }
            connection.close()
        finally:
            relay.stop()
            server.stop()

    return {**_figures(sent, arrivals), **backlog}


def _warm_up(relay: Relay, standin: CopernicaStandIn) -> None:
    """One delivery end to end first: the worker fetches the field list once."""
    sent = send_paced(relay, 1, 1, prefix="warm-up")
    _wait_for_puts(standin, sent)
    standin.clear()


def send_paced(relay: Relay, rate: float, seconds: float, prefix="e2e") -> dict:
    """Send ``rate * seconds`` events, each at its own moment.

    Returns, per event tag: when it was due, when its 2xx arrived (or
    None) and the status.
    """
    total = int(rate * seconds)
    port = int(relay.url.rsplit(":", 1)[1])
    results: dict[str, dict] = {}
    lock = threading.Lock()
    counter = iter(range(total))
    start = time.monotonic() + 0.2

    def sender() -> None:
        connection = HTTPConnection("127.0.0.1", port, timeout=10)
        while True:
            with lock:
                number = next(counter, None)
            if number is None:
                break
            due = start + number / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            tag = f"{prefix}-{number}"
            body = json.dumps(
                {
                    **BODY,
                    "email": f"{prefix}-{number % CUSTOMERS}@example.com",
                    "first_name": tag,
                    "updated_at": datetime.now(UTC).isoformat(),
                }
            ).encode()
            headers = {
                "Content-Type": "application/json",
                "X-Shopify-Topic": "customers/create",
                "X-Shopify-Hmac-Sha256": sign(SHOPIFY_SECRET.encode(), body),
                "X-Shopify-Shop-Domain": "bench.myshopify.com",
                "X-Shopify-Webhook-Id": f"{prefix}-{number}",
            }
            sent_at = time.monotonic()
            try:
                connection.request("POST", "/webhooks/shopify", body, headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except OSError:
                connection.close()
                connection = HTTPConnection("127.0.0.1", port, timeout=10)
                status = None
            answered_at = time.monotonic()
            with lock:
                results[tag] = {
                    "due": due,
                    "sent_at": sent_at,
                    "answered_at": answered_at,
                    "status": status,
                }
        connection.close()

    threads = [threading.Thread(target=sender) for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _wait_for_puts(standin: CopernicaStandIn, sent: dict) -> dict[str, float]:
    """When the stand-in received the PUT of each accepted event."""
    expected = {tag for tag, event in sent.items() if event["status"] == 202}
    deadline = time.monotonic() + DRAIN_SECONDS
    arrivals: dict[str, float] = {}
    while time.monotonic() < deadline:
        for request in standin.requests:
            if request.method == "PUT" and isinstance(request.json, dict):
                tag = request.json.get("firstname")
                if tag in expected and tag not in arrivals:
                    arrivals[tag] = request.received_at
        if len(arrivals) == len(expected):
            break
        time.sleep(0.2)
    return arrivals


def _figures(sent: dict, arrivals: dict[str, float]) -> dict:
    accepted = [tag for tag, event in sent.items() if event["status"] == 202]
    latencies = sorted(
        (arrivals[tag] - sent[tag]["answered_at"]) * 1000
        for tag in accepted
        if tag in arrivals
    )
    acks = sorted(
        (event["answered_at"] - event["sent_at"]) * 1000 for event in sent.values()
    )
    lateness = sorted(
        (event["sent_at"] - event["due"]) * 1000 for event in sent.values()
    )
    span = max(e["sent_at"] for e in sent.values()) - min(
        e["sent_at"] for e in sent.values()
    )
    return {
        "sent": len(sent),
        "accepted": len(accepted),
        "delivered": len(latencies),
        # Accepted but no PUT seen within the wait: lost, unless still queued.
        "undelivered": len(accepted) - len(latencies),
        "not_accepted": len(sent) - len(accepted),
        "achieved_rate_per_second": round((len(sent) - 1) / span, 1) if span else 0,
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p90_ms": round(percentile(latencies, 0.90), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(latencies[-1], 1) if latencies else None,
        "p50_ms_target": TARGET_P50_MS,
        "p99_ms_target": TARGET_P99_MS,
        "ack_p50_ms": round(percentile(acks, 0.50), 1),
        "ack_p99_ms": round(percentile(acks, 0.99), 1),
        "send_lateness_p99_ms": round(percentile(lateness, 0.99), 1),
    }


if __name__ == "__main__":
    main()
