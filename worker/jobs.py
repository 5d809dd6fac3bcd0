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
from app.logs import mask_fields, mask_selector
from app.settings import Settings, load_settings
from worker.copernica import API_VERSIONS, Answer, Call, CopernicaClient, TransportError
from worker.mapping import (
    MappedValueError,
    ProfileUpdate,
    Rule,
    Skipped,
    apply_rules,
    load_mapping,
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
    rules = load_mapping(settings.mappings_path, settings.copernica_database)
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


def deliver(record: dict[str, Any]) -> dict[str, Any] | Retry:
    delivery = Delivery.from_dict(record)
    ctx = context()
    job = get_current_job()
    attempt = (job.number_of_retries or 0) + 1 if job else 1
    facts = {
        "delivery": delivery.delivery_id,
        "source": delivery.source,
        "topic": delivery.topic,
        "attempt": attempt,
    }

    try:
        outcomes = apply_rules(
            ctx.rules, delivery.source, delivery.topic, delivery.body
        )
    except MappedValueError as error:
        _log("delivery failed", facts, outcome="failed", reason=str(error))
        raise DeliveryFailed(str(error)) from None

    if not outcomes:
        _log("delivery unmapped", facts, outcome="unmapped")
        return {"outcome": "unmapped", "calls": []}

    done = job.meta.setdefault("done", {}) if job else {}
    finished = False
    try:
        result = _deliver_each(ctx, outcomes, done, facts)
        finished = not isinstance(result, Retry)
        return result
    finally:
        # Calls already applied are remembered only when the job comes back
        # (a retry, a replay); a finished job has no use for the record.
        if job and done and not finished:
            job.save_meta()


def _deliver_each(
    ctx: WorkerContext,
    outcomes: list[ProfileUpdate | Skipped],
    done: dict[str, Any],
    facts: dict[str, Any],
) -> dict[str, Any] | Retry:
    results = []
    for outcome in outcomes:
        if isinstance(outcome, Skipped):
            _log(
                "rule skipped",
                facts,
                rule=outcome.rule,
                outcome="skipped",
                reason=outcome.reason,
            )
            results.append(
                {"rule": outcome.rule, "outcome": "skipped", "reason": outcome.reason}
            )
            continue
        if outcome.rule in done:
            results.append(done[outcome.rule])
            continue

        call = _profile_call(ctx, outcome)
        if ctx.client is None:
            _log(
                "dry run: request not sent",
                facts,
                rule=outcome.rule,
                outcome="dry_run",
                method=call.method,
                path=call.path,
                selector=mask_selector(outcome.selector),
                create=outcome.create,
                **{"async": outcome.async_},
                body=mask_fields(outcome.fields),
            )
            results.append(
                {"rule": outcome.rule, "outcome": "dry_run", "request": call.describe()}
            )
            continue

        result = _send(ctx, call, outcome, facts)
        if isinstance(result, Retry):
            return result
        done[outcome.rule] = result
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
    ctx: WorkerContext, call: Call, update: ProfileUpdate, facts: dict[str, Any]
) -> dict[str, Any] | Retry:
    started = time.monotonic()
    try:
        answer = ctx.client.send(call)
    except TransportError as error:
        answer, problem = None, str(error)
    else:
        problem = f"Copernica answered {answer.status}: {answer.message}"
    elapsed_ms = round((time.monotonic() - started) * 1000)

    if answer is not None and answer.ok:
        _log(
            "profile updated",
            facts,
            rule=update.rule,
            outcome="applied",
            status=answer.status,
            created_id=answer.created_id,
            duration_ms=elapsed_ms,
        )
        return {
            "rule": update.rule,
            "outcome": "applied",
            "status": answer.status,
            "created_id": answer.created_id,
            "request": call.describe(),
        }

    if answer is not None and not answer.retryable:
        _log(
            "delivery failed",
            facts,
            rule=update.rule,
            outcome="failed",
            status=answer.status,
            reason=problem,
            duration_ms=elapsed_ms,
        )
        raise DeliveryFailed(f"{update.rule}: {problem} (permanent, not retried)")

    return _retry_or_fail(ctx, answer, problem, update, facts, elapsed_ms)


def _retry_or_fail(
    ctx: WorkerContext,
    answer: Answer | None,
    problem: str,
    update: ProfileUpdate,
    facts: dict[str, Any],
    elapsed_ms: int,
) -> Retry:
    schedule = ctx.settings.retry_schedule_seconds
    retries_done = facts["attempt"] - 1
    retry_after = parse_retry_after(answer.retry_after) if answer else None
    delay = next_delay(retries_done, schedule, retry_after)
    status = answer.status if answer else None

    if delay is None:
        _log(
            "delivery failed",
            facts,
            rule=update.rule,
            outcome="failed",
            status=status,
            reason=problem,
            duration_ms=elapsed_ms,
            level=logging.WARNING,
        )
        raise DeliveryFailed(
            f"{update.rule}: gave up after {facts['attempt']} attempts; last: {problem}"
        )

    _log(
        "delivery will be retried",
        facts,
        rule=update.rule,
        outcome="retry",
        status=status,
        reason=problem,
        retry_in_s=delay,
        duration_ms=elapsed_ms,
        level=logging.WARNING,
    )
    return Retry(max=len(schedule), interval=delay)


def _overall(results: list[dict[str, Any]]) -> str:
    outcomes = {result["outcome"] for result in results}
    return outcomes.pop() if len(outcomes) == 1 else "mixed"


def _log(event: str, facts: dict[str, Any], level: int = logging.INFO, **more) -> None:
    log.log(level, event, extra={"fields": {**facts, **more}})
