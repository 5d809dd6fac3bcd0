"""The delivery job: one queued webhook becomes Copernica profile updates.

RQ calls ``deliver`` with the delivery record. Every mapping rule that matches
gives one PUT, made while holding that profile's lock and only if the event is
not older than the newest one that rule already applied to the profile (see
worker/profiles.py).

What a later run needs is kept in the job's meta: the calls already applied
(never repeated on a retry), the failures so far (they pick the delay from
the retry schedule) and, for a failed delivery, the reason. A retryable
failure returns an RQ ``Retry`` with that delay: the worker's scheduler brings
the job back, nothing sleeps here. A permanent one raises DeliveryFailed,
which leaves the job in RQ's failed registry for the operator to read and
replay.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

from rq import Retry, get_current_job

from app.deliveries import Delivery
from app.logs import mask_fields, mask_selector
from app.settings import Settings, load_settings
from worker.copernica import API_VERSIONS, Call, CopernicaClient, TransportError
from worker.mapping import (
    MappedValueError,
    ProfileUpdate,
    Rule,
    Skipped,
    apply_rules,
    load_rules,
)
from worker.profiles import ProfileGuard, event_time
from worker.retry import next_delay, parse_retry_after

log = logging.getLogger("relay.worker")

UNSET_DATABASE = "COPERNICA_DATABASE-unset"

#: A job returning Retry is brought back by RQ until it has returned Retry
#: this often; the relay's own schedule decides long before.
RQ_RETRY_CEILING = 10_000

#: Seconds kept free at the end of the job's time: a call is only started
#: when its worst case (connect + read timeout) still fits before RQ's limit.
JOB_TIME_MARGIN_SECONDS = 1.0

#: A delivery whose profile is locked by another one comes back after this
#: many seconds, plus up to as many again at random.
PROFILE_BUSY_DELAY_SECONDS = 1

#: The profile lock outlives the job's time limit by this much, so a worker
#: that dies holding it blocks the profile for seconds, not forever.
LOCK_GRACE_SECONDS = 2


class DeliveryFailed(Exception):
    """The delivery cannot succeed as it is; the message says why, for people."""


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    rules: list[Rule]
    client: CopernicaClient | None  # None when running dry


@cache
def context() -> WorkerContext:
    """Settings, mapping and HTTP session, built once per worker process."""
    settings = load_settings()
    rules = load_rules(settings)
    client = None
    if not settings.dry_run:
        client = CopernicaClient(
            base_url=settings.copernica_base_url,
            access_token=settings.copernica_access_token,
            api=API_VERSIONS[settings.copernica_api_version],
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
        )
    return WorkerContext(settings, rules, client)


@dataclass
class Attempt:
    """One run of a delivery job, and what it carries over to the next run."""

    facts: dict[str, Any]
    done: dict[str, Any]  # rule -> result of calls already applied or skipped
    failures: int  # earlier runs that ended in a retryable failure
    deadline: float  # monotonic time by which the job must have returned
    event_time: float | None  # epoch seconds of the event, if the sender says

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def deliver(record: dict[str, Any]) -> dict[str, Any] | Retry:
    delivery = Delivery.from_dict(record)
    ctx = context()
    job = get_current_job()
    meta = job.meta if job else {}
    timeout = job.timeout if job and job.timeout else ctx.settings.job_timeout_seconds
    failures = int(meta.get("failures", 0))
    attempt = Attempt(
        facts={
            "delivery": delivery.delivery_id,
            "source": delivery.source,
            "topic": delivery.topic,
            "attempt": failures + 1,
        },
        done=meta.setdefault("done", {}),
        failures=failures,
        deadline=time.monotonic() + timeout - JOB_TIME_MARGIN_SECONDS,
        event_time=event_time(delivery.body, delivery.event_at, delivery.source),
    )

    finished = False
    try:
        result = _deliver(ctx, delivery, attempt, job.connection if job else None)
        finished = not isinstance(result, Retry)
        return result
    except DeliveryFailed as error:
        meta["reason"] = str(error)
        meta["failed_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        raise
    finally:
        # What a later run needs (calls applied, failures counted) is saved
        # only when there will be a later run: a retry, or a replay.
        if job and not finished:
            meta["failures"] = attempt.failures
            meta["attempts"] = attempt.facts["attempt"]
            job.save_meta()


def _deliver(
    ctx: WorkerContext, delivery: Delivery, attempt: Attempt, connection
) -> dict[str, Any] | Retry:
    try:
        outcomes = apply_rules(
            ctx.rules, delivery.source, delivery.topic, delivery.body
        )
    except MappedValueError as error:
        _log("delivery failed", attempt, outcome="failed", reason=str(error))
        raise DeliveryFailed(str(error)) from None

    if not outcomes:
        _log("delivery unmapped", attempt, outcome="unmapped")
        return {"outcome": "unmapped", "calls": []}

    results = []
    calls_this_run = 0
    for outcome in outcomes:
        if isinstance(outcome, Skipped):
            _log(
                "rule skipped",
                attempt,
                rule=outcome.rule,
                outcome="skipped",
                reason=outcome.reason,
            )
            results.append(
                {"rule": outcome.rule, "outcome": "skipped", "reason": outcome.reason}
            )
            continue
        if outcome.rule in attempt.done:
            results.append(attempt.done[outcome.rule])
            continue

        call = _profile_call(ctx, outcome)
        if ctx.client is None:
            _log(
                "dry run: request not sent",
                attempt,
                rule=outcome.rule,
                outcome="dry_run",
                method=call.method,
                path=call.path,
                selector=mask_selector(outcome.selector),
                create=outcome.create,
                body=mask_fields(outcome.fields),
                **{"async": outcome.async_},
            )
            results.append(
                {"rule": outcome.rule, "outcome": "dry_run", "request": call.describe()}
            )
            continue

        settings = ctx.settings
        worst_case = settings.connect_timeout_seconds + settings.read_timeout_seconds
        if calls_this_run and attempt.remaining() < worst_case:
            # RQ would kill a call that outlives the job's time, and count a
            # timeout as a permanent failure; continue in a fresh run instead.
            _log(
                "delivery continues in a new run",
                attempt,
                rule=outcome.rule,
                outcome="continued",
            )
            return Retry(max=RQ_RETRY_CEILING, interval=1)

        guard = ProfileGuard(
            connection,
            outcome.database or UNSET_DATABASE,
            outcome.selector,
            lock_seconds=settings.job_timeout_seconds + LOCK_GRACE_SECONDS,
            mark_ttl_seconds=settings.order_ttl_seconds,
        )
        if not guard.acquire():
            # Another delivery is writing this profile; two create=1 PUTs at
            # once could create it twice. Come back shortly, not as a failure.
            delay = PROFILE_BUSY_DELAY_SECONDS + random.randint(
                0, PROFILE_BUSY_DELAY_SECONDS
            )
            _log(
                "profile busy, delivery comes back shortly",
                attempt,
                rule=outcome.rule,
                outcome="busy",
                retry_in_s=delay,
            )
            return Retry(max=RQ_RETRY_CEILING, interval=delay)
        try:
            calls_this_run += 1
            result = _apply_in_order(ctx, call, outcome, attempt, guard)
        finally:
            guard.release()
        if isinstance(result, Retry):
            return result
        attempt.done[outcome.rule] = result
        results.append(result)

    return {"outcome": _overall(results), "calls": results}


def _apply_in_order(
    ctx: WorkerContext,
    call: Call,
    update: ProfileUpdate,
    attempt: Attempt,
    guard: ProfileGuard,
) -> dict[str, Any] | Retry:
    """Send the call unless a newer event already reached this profile."""
    moment = attempt.event_time
    mark = guard.mark(update.rule) if moment is not None else None
    if mark is not None and moment < mark:
        reason = (
            f"older than the newest event applied to this profile "
            f"({_iso(moment)} < {_iso(mark)})"
        )
        _log(
            "rule skipped", attempt, rule=update.rule, outcome="skipped", reason=reason
        )
        return {"rule": update.rule, "outcome": "skipped", "reason": reason}

    result = _send(ctx, call, update, attempt)
    if moment is not None and not isinstance(result, Retry):
        # Written only now that Copernica took the PUT: a failed call must
        # not make the retry of this very event look stale.
        guard.raise_mark(update.rule, moment)
    return result


def _profile_call(ctx: WorkerContext, update: ProfileUpdate) -> Call:
    api = (
        ctx.client.api
        if ctx.client
        else API_VERSIONS[ctx.settings.copernica_api_version]
    )
    return api.profile_put(update, update.database or UNSET_DATABASE)


def _send(
    ctx: WorkerContext, call: Call, update: ProfileUpdate, attempt: Attempt
) -> dict[str, Any] | Retry:
    started = time.monotonic()
    try:
        answer = ctx.client.send(call)
    except TransportError as error:
        answer, problem = None, str(error)
    else:
        problem = f"Copernica answered {answer.status}: {answer.message}"
    timing = {"duration_ms": round((time.monotonic() - started) * 1000)}

    if answer is not None and answer.ok:
        _log(
            "profile updated",
            attempt,
            rule=update.rule,
            outcome="applied",
            status=answer.status,
            created_id=answer.created_id,
            **timing,
        )
        return {
            "rule": update.rule,
            "outcome": "applied",
            "status": answer.status,
            "created_id": answer.created_id,
            "request": call.describe(),
        }

    status = answer.status if answer else None
    if answer is not None and not answer.retryable:
        _log(
            "delivery failed",
            attempt,
            rule=update.rule,
            outcome="failed",
            status=status,
            reason=problem,
            level=logging.WARNING,
            **timing,
        )
        raise DeliveryFailed(
            f"{update.rule}: {problem} (permanent, not retried; "
            f"attempt {attempt.failures + 1})"
        )

    attempt.failures += 1
    retry_after = parse_retry_after(answer.retry_after) if answer else None
    schedule = ctx.settings.retry_schedule_seconds
    delay = next_delay(attempt.failures - 1, schedule, retry_after)
    if delay is None:
        _log(
            "delivery failed",
            attempt,
            rule=update.rule,
            outcome="failed",
            status=status,
            reason=problem,
            level=logging.WARNING,
            **timing,
        )
        raise DeliveryFailed(
            f"{update.rule}: gave up after {attempt.failures} attempts; last: {problem}"
        )

    _log(
        "delivery will be retried",
        attempt,
        rule=update.rule,
        outcome="retry",
        status=status,
        reason=problem,
        retry_in_s=delay,
        level=logging.WARNING,
        **timing,
    )
    return Retry(max=RQ_RETRY_CEILING, interval=delay)


def _overall(results: list[dict[str, Any]]) -> str:
    outcomes = {result["outcome"] for result in results}
    return outcomes.pop() if len(outcomes) == 1 else "mixed"


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def _log(event: str, attempt: Attempt, level: int = logging.INFO, **more) -> None:
    log.log(level, event, extra={"fields": {**attempt.facts, **more}})
