"""The delivery job: one queued webhook becomes Copernica profile updates.

RQ calls ``deliver`` with the delivery record. Every mapping rule that matches
gives one PUT. Calls that succeeded are remembered in the job's meta, so a
retry after a later call failed does not repeat them. A retryable failure
returns an RQ ``Retry`` with the delay from the schedule (the worker's
scheduler brings the job back; nothing sleeps here); a permanent one raises
DeliveryFailed, which leaves the job in RQ's failed registry with the reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from rq import Retry, get_current_job

from app.deliveries import Delivery
from app.intake import JOB_TIMEOUT_SECONDS
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
from worker.retry import next_delay, parse_retry_after

log = logging.getLogger("relay.worker")

UNSET_DATABASE = "COPERNICA_DATABASE-unset"


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


#: A job returning Retry is brought back by RQ until it has returned Retry
#: this often; the relay's own schedule decides long before.
RQ_RETRY_CEILING = 10_000

#: Seconds kept free at the end of the job's time: a call is only started
#: when its worst case (connect + read timeout) still fits before RQ's limit.
JOB_TIME_MARGIN_SECONDS = 1.0


@dataclass
class Attempt:
    """One run of a delivery job, and what it carries over to the next run."""

    facts: dict[str, Any]
    done: dict[str, Any]  # rule -> result of calls already applied
    failures: int  # earlier runs that ended in a retryable failure
    deadline: float  # monotonic time by which the job must have returned

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def deliver(record: dict[str, Any]) -> dict[str, Any] | Retry:
    delivery = Delivery.from_dict(record)
    ctx = context()
    job = get_current_job()
    meta = job.meta if job else {}
    timeout = job.timeout if job and job.timeout else JOB_TIMEOUT_SECONDS
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
    )

    finished = False
    try:
        result = _deliver(ctx, delivery, attempt)
        finished = not isinstance(result, Retry)
        return result
    finally:
        # What a later run needs (calls applied, failures counted) is saved
        # only when there will be a later run: a retry, or a replay.
        if job and not finished:
            meta["failures"] = attempt.failures
            job.save_meta()


def _deliver(
    ctx: WorkerContext, delivery: Delivery, attempt: Attempt
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

        worst_case = (
            ctx.settings.connect_timeout_seconds + ctx.settings.read_timeout_seconds
        )
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

        calls_this_run += 1
        result = _send(ctx, call, outcome, attempt)
        if isinstance(result, Retry):
            return result
        attempt.done[outcome.rule] = result
        results.append(result)

    return {"outcome": _overall(results), "calls": results}


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


def _log(event: str, attempt: Attempt, level: int = logging.INFO, **more) -> None:
    log.log(level, event, extra={"fields": {**attempt.facts, **more}})
