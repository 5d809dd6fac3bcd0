"""Soak with faults: thousands of signed webhooks while things break, then a count.

Real gunicorn, two ``python -m worker`` processes, a Redis with append-only
persistence and the Copernica stand-in, all on loopback. Signed Shopify
(customers/create, customers/update, email consent) and Typeform events are
sent at a steady pace, with duplicates and out-of-order versions per customer,
while a timer kills a worker mid-request, restarts Redis, makes Copernica
answer 503 (then 429 with Retry-After, then hang) and restarts the web
process. The sender retries a 503 or a broken connection, as Shopify and
Typeform do. Once the queue has drained against a healthy stand-in, every
event is accounted for:

- accepted (2xx): applied by a successful PUT, or skipped as older than the
  profile's newest event, or in the failed list with a reason. A PUT that
  Copernica took while Redis was restarting may be sent again, because the
  worker could not record it (worker/jobs.py says so); such a repeat is
  counted as ``applied_again`` and is a problem only when a newer event for
  the same profile and rule was written in between;
- never accepted (every try answered 503 or failed): applied by no PUT;
- per customer: one profile, holding the newest accepted data of each rule.

Each event carries a unique tag (a first name or a consent level) so the
stand-in's recorded PUTs say which event they applied.

    .venv/bin/python -m bench.chaos            # full soak, a few minutes
    .venv/bin/python -m bench.chaos --short    # the CI version, under a minute
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
import requests
from rq.job import Job
from rq.serializers import JSONSerializer

from bench.common import record
from tests.harness import (
    COPERNICA_TOKEN,
    DATABASE_FIELDS,
    Relay,
    fixture_bytes,
    relay_env,
    shopify_headers,
    typeform_headers,
)
from tests.leaks import dump_jobs
from tests.standin.copernica import CopernicaStandIn, Fault
from tools.embedded_redis import RedisServer

#: PUT answers that mean Copernica applied the change (v1: 303 or 200).
APPLIED_STATUSES = (200, 201, 204, 303)

EPOCH = datetime(2026, 8, 14, 8, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Plan:
    """How big the soak is and when each fault strikes (seconds after start)."""

    events: int
    shopify_customers: int
    typeform_customers: int
    duplicate_share: float
    send_seconds: float
    kill_worker_at: float
    restart_redis_at: float
    outage_at: float
    outage_seconds: float
    throttle_at: float
    hang_at: float
    restart_web_at: float
    retry_schedule: str
    drain_timeout: float


FULL = Plan(
    events=3000,
    shopify_customers=300,
    typeform_customers=150,
    duplicate_share=0.1,
    send_seconds=130,
    kill_worker_at=10,
    restart_redis_at=25,
    outage_at=35,
    outage_seconds=60,
    throttle_at=100,
    hang_at=110,
    restart_web_at=120,
    retry_schedule="1,2,4,8,15,30,30,30,30",
    drain_timeout=300,
)

SHORT = Plan(
    events=300,
    shopify_customers=40,
    typeform_customers=20,
    duplicate_share=0.1,
    send_seconds=24,
    kill_worker_at=3,
    restart_redis_at=7,
    outage_at=10,
    outage_seconds=5,
    throttle_at=16,
    hang_at=18,
    restart_web_at=21,
    retry_schedule="1,1,2,3,5,5,5",
    drain_timeout=60,
)


@dataclass
class Event:
    """One webhook event; its tag is unique and shows up in the PUT it causes."""

    tag: str
    source: str
    rule: str
    email: str
    moment: datetime
    body: bytes
    headers: dict[str, str]
    sends: list[str] = field(default_factory=list)
    job_id: str | None = None

    @property
    def accepted(self) -> bool:
        return self.job_id is not None


@dataclass
class Timeline:
    started: float = field(default_factory=time.monotonic)
    entries: list[tuple[float, str]] = field(default_factory=list)

    def note(self, what: str) -> None:
        at = round(time.monotonic() - self.started, 1)
        self.entries.append((at, what))
        print(f"  t={at:6.1f}s  {what}", flush=True)


# ----------------------------------------------------------------- the events


def build_events(plan: Plan, rng: random.Random) -> list[Event]:
    """Versions per customer with rising times, shuffled, some sent twice."""
    customer_template = json.loads(fixture_bytes("shopify/customers_update.json"))
    consent_template = json.loads(
        fixture_bytes("shopify/customers_email_marketing_consent_update.json")
    )
    typeform_template = json.loads(fixture_bytes("typeform/form_response.json"))

    shop_emails = [f"soak-shop-{n}@example.com" for n in range(plan.shopify_customers)]
    form_emails = [f"soak-form-{n}@example.com" for n in range(plan.typeform_customers)]
    versions: Counter = Counter()
    events = []
    for number in range(plan.events):
        kind = rng.choices(["customer", "consent", "typeform"], [55, 20, 25])[0]
        email = rng.choice(form_emails if kind == "typeform" else shop_emails)
        versions[(kind, email)] += 1
        # Distinct, rising times per customer and kind; the shuffle below
        # sends them out of order.
        moment = EPOCH + timedelta(seconds=versions[(kind, email)] * 7)
        tag = f"{kind[0].upper()}{number}"
        if kind == "customer":
            events.append(_customer(customer_template, email, moment, tag, number))
        elif kind == "consent":
            events.append(_consent(consent_template, email, moment, tag, number))
        else:
            events.append(_typeform(typeform_template, email, moment, tag))

    rng.shuffle(events)
    sends = list(events)
    for event in rng.sample(events, int(len(events) * plan.duplicate_share)):
        sends.insert(rng.randrange(len(sends) + 1), event)
    return sends


def _customer(template, email, moment, tag, number) -> Event:
    body = dict(template, email=email, first_name=tag, id=10_000 + number)
    body["updated_at"] = moment.isoformat()
    raw = json.dumps(body).encode()
    topic = "customers/update" if number % 4 else "customers/create"
    headers = shopify_headers(raw, topic, f"soak-{uuid.uuid4()}")
    return Event(tag, "shopify", "shopify-customer", email, moment, raw, headers)


def _consent(template, email, moment, tag, number) -> Event:
    consent = dict(template["email_marketing_consent"], opt_in_level=tag)
    consent["consent_updated_at"] = moment.isoformat()
    body = dict(template, email_address=email, email_marketing_consent=consent)
    raw = json.dumps(body).encode()
    # The consent body has no updated_at: the trigger time orders it.
    headers = shopify_headers(
        raw,
        "customers_email_marketing_consent/update",
        f"soak-{uuid.uuid4()}",
        **{"X-Shopify-Triggered-At": moment.isoformat().replace("+00:00", "Z")},
    )
    return Event(tag, "shopify", "shopify-email-consent", email, moment, raw, headers)


def _typeform(template, email, moment, tag) -> Event:
    answers = []
    for answer in template["form_response"]["answers"]:
        ref = answer["field"]["ref"]
        if ref == "first_name":
            answer = dict(answer, text=tag)
        elif ref == "email":
            answer = dict(answer, email=email)
        answers.append(answer)
    response = dict(
        template["form_response"],
        answers=answers,
        token=uuid.uuid4().hex,
        submitted_at=moment.isoformat().replace("+00:00", "Z"),
    )
    raw = json.dumps(dict(template, form_response=response)).encode()
    return Event(
        tag, "typeform", "typeform-response", email, moment, raw, typeform_headers(raw)
    )


# ------------------------------------------------------------------ sending


def send(relay: Relay, event: Event, stop_at: float) -> None:
    """Post until answered 2xx, retrying 503s and broken connections, bounded."""
    while time.monotonic() < stop_at:
        try:
            response = requests.post(
                f"{relay.url}/webhooks/{event.source}",
                data=event.body,
                headers=event.headers,
                timeout=5,
            )
            outcome = str(response.status_code)
        except requests.RequestException as error:
            response, outcome = None, type(error).__name__
        event.sends.append(outcome)
        if response is not None and response.status_code in (200, 202):
            event.job_id = response.json()["job"]
            return
        if response is not None and response.status_code != 503:
            return  # a 4xx or 500: not retried, counted as a problem
        time.sleep(0.5)


def send_all(relay: Relay, sends: list[Event], seconds: float, give_up_at: float):
    """Spread the sends evenly over ``seconds``, eight at a time."""
    started = time.monotonic()
    pace = seconds / max(len(sends), 1)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for index, event in enumerate(sends):
            delay = started + index * pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, relay, event, give_up_at)


# ------------------------------------------------------------------- faults


def run_faults(plan, relay, standin, redis_server, timeline, stop: threading.Event):
    """The timer: each fault at its second, unless the run is stopping."""

    def at(second: float) -> bool:
        delay = timeline.started + second - time.monotonic()
        return not stop.wait(max(delay, 0))

    if at(plan.kill_worker_at):
        # Both workers' next PUTs hang, so the kill lands mid-request.
        standin.add_fault(Fault(method="PUT", status=503, hang=True, times=2))
        _wait_for_held(standin, 2, stop)
        victim = relay.workers[0]
        victim.stop(signal.SIGKILL)
        timeline.note(f"SIGKILL {victim.name} (pid {victim.process.pid}) mid-request")
        standin.release()
        replacement = relay.start_worker()
        timeline.note(f"started {replacement.name}")

    if at(plan.restart_redis_at):
        redis_server.stop()
        timeline.note("Redis stopped")
        time.sleep(1.0)
        redis_server.start()
        timeline.note("Redis started (append-only file reloaded)")

    if at(plan.outage_at):
        # The load balancer's 503 for every call, as in an overload.
        standin.overload_above_concurrency = 0
        timeline.note(f"Copernica answers 503 for {plan.outage_seconds:.0f} s")
        if at(plan.outage_at + plan.outage_seconds):
            standin.overload_above_concurrency = None
            timeline.note("Copernica healthy again")

    if at(plan.throttle_at):
        standin.add_fault(
            Fault(method="PUT", status=429, headers={"Retry-After": "3"}, times=20)
        )
        timeline.note("Copernica answers the next 20 PUTs 429, Retry-After: 3")

    if at(plan.hang_at):
        standin.add_fault(Fault(method="PUT", status=503, hang=True, times=4))
        timeline.note("Copernica hangs the next 4 PUTs")
        if at(plan.hang_at + 2.5):
            standin.release()
            timeline.note("hung PUTs released (answered 503 to gone clients)")

    if at(plan.restart_web_at):
        relay.web.stop(signal.SIGTERM)
        timeline.note("web process stopped (SIGTERM)")
        relay.start_web()
        timeline.note("web process started")


def _wait_for_held(standin, count: int, stop: threading.Event) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not stop.is_set():
        held = [r for r in standin.requests if r.method == "PUT" and r.status is None]
        if len(held) >= count:
            return
        time.sleep(0.05)


# ---------------------------------------------------------------- counting


def wait_for_drain(connection, events: list[Event], timeout: float) -> dict:
    """Job statuses once every accepted job has finished or failed."""
    job_ids = sorted({e.job_id for e in events if e.accepted})
    deadline = time.monotonic() + timeout
    while True:
        statuses = _statuses(connection, job_ids)
        pending = [j for j in job_ids if statuses.get(j) not in ("finished", "failed")]
        if not pending or time.monotonic() > deadline:
            return statuses
        time.sleep(0.5)


def _statuses(connection, job_ids) -> dict:
    try:
        with connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(f"rq:job:{job_id}", "status")
            values = pipe.execute()
    except redis.RedisError:
        return {}
    return {j: v.decode() if v else None for j, v in zip(job_ids, values, strict=True)}


def tag_of(body: dict) -> str | None:
    return body.get("firstname") or body.get("email_consent_level")


def account(connection, standin, events, statuses, started: float) -> dict:
    """Sort every event into exactly one outcome; anything else is a problem."""
    writes = defaultdict(list)  # tag -> when each successful PUT arrived
    for request in standin.requests:
        if request.method == "PUT" and request.status in APPLIED_STATUSES:
            tag = tag_of(request.json or {})
            if tag:
                writes[tag].append(request.received_at - started)

    unique = list({e.tag: e for e in events}.values())
    counts: Counter = Counter()
    problems: list[str] = []
    notes: list[str] = []
    for event in unique:
        times = len(writes[event.tag])
        if not event.accepted:
            counts["rejected"] += 1
            if times:
                problems.append(f"{event.tag}: never accepted, yet applied")
            continue

        counts["accepted"] += 1
        if "503" in event.sends:
            counts["accepted_after_503"] += 1
        status = statuses.get(event.job_id)
        if times == 1:
            counts["applied"] += 1
        elif times > 1:
            counts["applied"] += 1
            counts["applied_again"] += 1
            problem = rewrite_over_newer(event, unique, writes)
            at = ", ".join(f"t={t:.1f}s" for t in writes[event.tag])
            if problem:
                problems.append(problem)
            else:
                notes.append(f"{event.tag}: the same write repeated ({at})")
        elif status == "failed":
            counts["failed"] += 1
            if not _failure_reason(connection, event.job_id):
                problems.append(f"{event.tag}: failed without a reason")
        elif status == "finished" and _outcome(connection, event.job_id) == "skipped":
            counts["skipped"] += 1
        else:
            counts["lost"] += 1
            problems.append(f"{event.tag}: accepted, job {status}, never applied")

    mismatches = check_profiles(standin, unique, writes, statuses)
    counts["profile_mismatches"] = len(mismatches)
    return {"counts": counts, "problems": problems + mismatches, "notes": notes}


def rewrite_over_newer(event: Event, events: list[Event], writes) -> str | None:
    """A repeated write is harmless unless a newer event's write came between."""
    first, last = min(writes[event.tag]), max(writes[event.tag])
    for other in events:
        if (other.email, other.rule) != (event.email, event.rule):
            continue
        if other.moment > event.moment and any(
            first < t < last for t in writes[other.tag]
        ):
            return f"{event.tag}: written again after the newer {other.tag}"
    return None


def _outcome(connection, job_id) -> str | None:
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    result = job.return_value()
    return result.get("outcome") if isinstance(result, dict) else None


def _failure_reason(connection, job_id) -> str | None:
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    return job.meta.get("reason")


def check_profiles(standin, events, writes, statuses) -> list[str]:
    """One profile per customer, holding each rule's newest data that went in."""
    newest: dict[tuple[str, str], Event] = {}
    for event in events:
        if not writes[event.tag]:
            continue
        key = (event.email, event.rule)
        if key not in newest or event.moment > newest[key].moment:
            newest[key] = event

    by_email = defaultdict(list)
    for profile in standin.profiles(1234):
        by_email[profile["fields"]["email"]].append(profile["fields"])

    problems = []
    for (email, rule), event in sorted(newest.items()):
        found = by_email.get(email, [])
        if len(found) != 1:
            problems.append(f"{email}: {len(found)} profiles")
            continue
        field_name = "email_consent_level" if rule.endswith("consent") else "firstname"
        if found[0][field_name] != event.tag:
            problems.append(
                f"{email} {rule}: profile has {found[0][field_name]}, "
                f"newest applied is {event.tag}"
            )
    # An accepted event newer than what the profile holds must have failed.
    for event in events:
        key = (event.email, event.rule)
        if event.accepted and key in newest and event.moment > newest[key].moment:
            if statuses.get(event.job_id) != "failed":
                problems.append(f"{event.tag}: newer than the profile's data, lost")
    return sorted(set(problems))


# --------------------------------------------------------------------- run


def run(plan: Plan, folder: Path, seed: int = 7) -> dict:
    rng = random.Random(seed)
    sends = build_events(plan, rng)
    timeline = Timeline()
    stop = threading.Event()

    redis_server = RedisServer(folder / "redis", unix_socket=False)
    redis_server.start()
    standin = CopernicaStandIn(
        access_token=COPERNICA_TOKEN,
        databases={1234: DATABASE_FIELDS},
        put_status=303,
        upsert_window=0.05,
    )
    standin.start()
    relay = Relay(
        env=relay_env(
            redis_server.url,
            standin.base_url,
            RELAY_RETRY_SCHEDULE=plan.retry_schedule,
            COPERNICA_CONNECT_TIMEOUT="1",
            COPERNICA_READ_TIMEOUT="2",
            COPERNICA_MAX_RPS="0",
            RELAY_JOB_TIMEOUT="6",
            RELAY_RECOVERY_INTERVAL="1",
        ),
        log_dir=folder,
    )
    connection = redis.Redis.from_url(redis_server.url)
    faults = None
    try:
        relay.start_web()
        relay.start_worker()
        relay.start_worker()
        timeline = Timeline()
        timeline.note(f"sending {len(sends)} requests over {plan.send_seconds:.0f} s")
        faults = threading.Thread(
            target=run_faults,
            args=(plan, relay, standin, redis_server, timeline, stop),
            daemon=True,
        )
        faults.start()
        give_up_at = timeline.started + plan.send_seconds + 60
        send_all(relay, sends, plan.send_seconds, give_up_at)
        timeline.note("all requests answered or given up")
        faults.join(timeout=max(give_up_at - time.monotonic(), 1))

        # Whatever is still hanging is let go, with its 503.
        standin.overload_above_concurrency = None
        standin.release()
        statuses = wait_for_drain(connection, sends, plan.drain_timeout)
        timeline.note("queue drained")
        report = account(connection, standin, sends, statuses, timeline.started)
    finally:
        stop.set()
        standin.release()
        if faults is not None:
            faults.join(timeout=15)
        connection.close()
        relay.stop()
        standin.stop()
        # What the jobs hold, beside the logs, for the test suite's leak check.
        dump_jobs(redis_server.url, folder)
        redis_server.stop()

    unique = {event.tag: event for event in sends}.values()
    answers = Counter(outcome for event in unique for outcome in event.sends)
    counts = report["counts"]
    figures = {
        "sent": len(sends),
        "requests": sum(answers.values()),
        "answers": dict(sorted(answers.items())),
        "events": len(unique),
        "duplicates": answers["200"],
        **{
            name: counts[name]
            for name in (
                "accepted",
                "accepted_after_503",
                "rejected",
                "applied",
                "skipped",
                "failed",
                "applied_again",
                "profile_mismatches",
                "lost",
            )
        },
        "problems": report["problems"][:20],
        "notes": report["notes"][:20],
        "timeline": timeline.entries,
        "seconds": round(time.monotonic() - timeline.started, 1),
    }
    return figures


def print_summary(figures: dict) -> None:
    print("\nfaults:")
    for at, what in figures["timeline"]:
        print(f"  {at:6.1f}s  {what}")
    print("\ncounts:")
    for name in (
        "sent",
        "requests",
        "events",
        "accepted",
        "duplicates",
        "accepted_after_503",
        "rejected",
        "applied",
        "skipped",
        "failed",
        "applied_again",
        "profile_mismatches",
        "lost",
    ):
        print(f"  {name:24} {figures[name]}")
    print(f"  {'answers':24} {figures['answers']}")
    for note in figures["notes"]:
        print(f"  note: {note}")
    for problem in figures["problems"]:
        print(f"  problem: {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--short", "--smoke", action="store_true", help="the CI version"
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    plan = SHORT if args.short else FULL

    with tempfile.TemporaryDirectory(prefix="relay-chaos-") as scratch:
        figures = run(plan, Path(scratch), seed=args.seed)
    print_summary(figures)
    record(
        "chaos",
        {
            "plan": "short" if args.short else "full",
            "seed": args.seed,
            "smoke": args.short,
            **vars(plan),
        },
        figures,
    )
    sys.exit(0 if not figures["problems"] else 1)


if __name__ == "__main__":
    main()
