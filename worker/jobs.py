"""The delivery job: one queued webhook becomes Copernica profile updates.

RQ calls ``deliver`` with the delivery record. Every mapping rule that matches
gives one profile PUT (and, for a rule with a collection, one subprofile PUT
per item), made:

- only if every field it names exists in the target database (worker/schema);
- while holding that profile's lock, and only if the event is not older than
  the newest one that rule already applied to the profile (worker/profiles);
- within the calls per second and in flight that all workers share
  (worker/limits).

Shopify's privacy topics are handled apart (worker/privacy).

What a later run needs is kept in the job's meta: the calls already applied
(never repeated), the failures so far (they pick the delay from the retry
schedule) and, for a failed delivery, the reason. A retryable failure returns
an RQ ``Retry``: the worker's scheduler brings the job back, nothing sleeps
here beyond a second for a call slot. A permanent one raises DeliveryFailed,
which leaves the job in RQ's failed registry for the operator to read and
replay.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

import redis
from rq import Queue, Retry, get_current_job
from rq.timeouts import JobTimeoutException

from app.deliveries import Delivery
from app.logs import mask_fields, mask_selector
from app.metrics import RECORDER, status_class
from app.settings import Settings, load_settings
from worker import privacy as privacy_topics
from worker.copernica import (
    API_VERSIONS,
    Answer,
    AuthenticationRefused,
    Call,
    CopernicaClient,
    JwtSource,
    StaticToken,
    TransportError,
)
from worker.limits import SharedLimiter
from worker.mapping import (
    MappedValueError,
    PrivacyRule,
    ProfileUpdate,
    Rule,
    Skipped,
    SubprofileUpdate,
    apply_rules,
    load_privacy,
    load_rules,
    privacy_selectors,
)
from worker.profiles import ProfileGuard, event_time
from worker.retry import next_delay, parse_retry_after
from worker.schema import SchemaCache, SchemaUnavailable

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

#: Profiles asked for per page while matching a privacy request ...
REDACT_PAGE = 1000

#: ... and at most this many per match field.
REDACT_MAX_PROFILES = 100_000


class DeliveryFailed(Exception):
    """The delivery cannot succeed as it is; the message says why, for people.

    ``kind`` says the same in one word from a fixed list, for the metrics.
    """

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind


class ComeBack(Exception):
    """End this run now and return this Retry (a failure, a busy profile...).

    ``outcome`` is ``retried`` after a failure, ``deferred`` otherwise, and
    ``reason`` one word from a fixed list, for the metrics.
    """

    def __init__(self, retry: Retry, outcome: str = "deferred", reason: str = "busy"):
        self.retry = retry
        self.outcome = outcome
        self.reason = reason


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    rules: list[Rule]
    privacy: PrivacyRule


@cache
def context() -> WorkerContext:
    """Settings, mapping and HTTP session, built once per worker process."""
    settings = load_settings()
    rules = load_rules(settings)
    privacy = load_privacy(settings.mappings_path, settings.copernica_database)
    return WorkerContext(settings, rules, privacy)


def client_for(ctx: WorkerContext, connection) -> CopernicaClient | None:
    """The process's Copernica client (None when dry), built on first use."""
    global _client
    settings = ctx.settings
    if settings.dry_run:
        return None
    if _client is None:
        api = API_VERSIONS[settings.copernica_api_version]
        timeouts = (settings.connect_timeout_seconds, settings.read_timeout_seconds)
        if api.version >= 4:
            credentials = JwtSource(
                connection,
                settings.copernica_auth_url,
                settings.copernica_access_token,
                timeouts,
            )
        else:
            credentials = StaticToken(settings.copernica_access_token)
        _client = CopernicaClient(
            base_url=settings.copernica_base_url,
            credentials=credentials,
            api=api,
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
        )
    return _client


_client: CopernicaClient | None = None


@dataclass
class Attempt:
    """One run of a delivery job, and what it carries over to the next run."""

    facts: dict[str, Any]
    done: dict[str, Any]  # call label -> result of calls applied or skipped
    failures: int  # earlier runs that ended in a retryable failure
    deadline: float  # monotonic time by which the job must have returned
    event_time: float | None  # epoch seconds of the event, if the sender says
    calls: int = 0  # calls made in this run

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class Run:
    """The relay's machinery for one job run: client, schema, limiter, log."""

    def __init__(self, ctx: WorkerContext, attempt: Attempt, connection, job):
        self.ctx = ctx
        self.settings = ctx.settings
        self.attempt = attempt
        self.connection = connection
        self.job = job
        self.client = client_for(ctx, connection)
        self.last_duration_ms: int | None = None
        self.write_in_doubt = False
        self.skips: list[str] = []  # why rules were skipped, one word each
        self.schemas = (
            SchemaCache(
                connection,
                lambda call: self.send(call, "field list"),
                self.api,
                self.settings.schema_ttl_seconds,
                account=f"{self.settings.copernica_base_url}\n"
                f"{self.settings.copernica_access_token}",
            )
            if self.client
            else None
        )
        self.limiter = (
            SharedLimiter(
                connection,
                self.settings.copernica_max_rps,
                self.settings.copernica_max_concurrency,
                slot_seconds=self.settings.job_timeout_seconds,
            )
            if self.client
            else None
        )

    @property
    def api(self):
        return API_VERSIONS[self.settings.copernica_api_version]

    # -- sending --------------------------------------------------------------

    def send(self, call: Call, label: str) -> Answer:
        """One call within the shared limits; transport errors become Answers
        of status 0. Never starts a call that could outlive the job."""
        worst_case = (
            self.settings.connect_timeout_seconds + self.settings.read_timeout_seconds
        )
        if self.attempt.calls and self.attempt.remaining() < worst_case:
            # RQ would kill a call that outlives the job's time, and count a
            # timeout as a permanent failure; continue in a fresh run instead.
            self.log("delivery continues in a new run", rule=label, outcome="continued")
            raise ComeBack(Retry(max=RQ_RETRY_CEILING, interval=1), reason="continued")

        wait = self.limiter.acquire()
        if wait:
            delay = max(1, math.ceil(wait))
            # At debug level: under a long slowdown every waiting delivery
            # comes back every second or two, and the log would be all this.
            self.log(
                "call budget spent, delivery comes back shortly",
                rule=label,
                outcome="throttled",
                retry_in_s=delay,
                level=logging.DEBUG,
            )
            raise ComeBack(
                Retry(max=RQ_RETRY_CEILING, interval=delay), reason="throttled"
            )

        self.attempt.calls += 1
        started = time.monotonic()
        writes = call.method != "GET"
        if writes:
            # Until an answer says otherwise, Copernica may apply this call
            # even if the relay stops waiting for it (see _update_profile).
            self.write_in_doubt = True
        try:
            answer = self.client.send(call)
        except TransportError as error:
            answer = Answer(status=0, message=str(error), ambiguous=error.sent)
        except AuthenticationRefused as error:
            self.write_in_doubt = False
            self.fail(label, str(error), None, kind="auth")
        finally:
            self.limiter.release()
        if writes and not answer.ambiguous:
            self.write_in_doubt = False
        seconds = time.monotonic() - started
        self.last_duration_ms = round(seconds * 1000)
        RECORDER.call(call.method, answer.status, seconds)
        self.limiter.record(overload=answer.overload or answer.status == 0)
        return answer

    def require(
        self, answer: Answer, label: str, database: str | None = None
    ) -> Answer:
        """The answer if it succeeded; otherwise retry later or fail for good."""
        if answer.ok:
            return answer
        if answer.status == 400 and database and self.schemas:
            # Copernica refused a write; if a field vanished, the next check
            # must see the database as it is now, not as cached.
            self.schemas.forget(database)
        problem = (
            f"Copernica answered {answer.status}: {answer.message}"
            if answer.status
            else answer.message
        )
        timing = {"duration_ms": self.last_duration_ms}
        if answer.status and not answer.retryable:
            self.fail(
                label,
                f"{problem} (permanent, not retried; attempt "
                f"{self.attempt.failures + 1})",
                answer.status,
                kind="refused",
            )

        self.attempt.failures += 1
        retry_after = parse_retry_after(answer.retry_after)
        delay = next_delay(
            self.attempt.failures - 1, self.settings.retry_schedule_seconds, retry_after
        )
        if delay is None:
            self.fail(
                label,
                f"gave up after {self.attempt.failures} attempts; last: {problem}",
                answer.status or None,
                kind="retries_exhausted",
            )
        self.log(
            "delivery will be retried",
            rule=label,
            outcome="retry",
            status=answer.status or None,
            reason=problem,
            retry_in_s=delay,
            level=logging.WARNING,
            **timing,
        )
        raise ComeBack(
            Retry(max=RQ_RETRY_CEILING, interval=delay),
            outcome="retried",
            reason=status_class(answer.status),
        )

    def fail(
        self, label: str, reason: str, status: int | None, kind: str | None = None
    ):
        self.log(
            "delivery failed",
            rule=label,
            outcome="failed",
            status=status,
            reason=reason,
            level=logging.WARNING,
        )
        raise DeliveryFailed(
            f"{label}: {reason}", kind or ("refused" if status else "other")
        )

    # -- schema ---------------------------------------------------------------

    def check_fields(
        self,
        label: str,
        database: str,
        update: ProfileUpdate,
        cached: bytes | None = None,
    ) -> None:
        """Fail for good if the update names a field the database lacks.

        ``cached`` is the cached field list when the caller already read it."""
        problems = self._field_problems(database, update, fresh=False, cached=cached)
        if problems:
            # Perhaps the field was added a minute ago: ask Copernica again.
            problems = self._field_problems(database, update, fresh=True)
        if problems:
            self.fail(
                label,
                "; ".join(problems) + " (fix the mapping or the "
                "database, then requeue)",
                None,
                kind="missing_field",
            )

    def _field_problems(self, database, update, fresh: bool, cached=None):
        try:
            schema = self.schemas.get(database, fresh=fresh, cached=cached)
        except SchemaUnavailable as error:
            answer = error.answer
            if answer is not None and answer.status and not answer.retryable:
                self.fail(update.rule, str(error), answer.status)
            self.require(answer or Answer(status=0, message=str(error)), update.rule)

        problems = []
        where = f"database {database}"
        for name in schema.missing([n for n, _ in update.selector], selector=True):
            problems.append(f"key field {name!r} is not a field of {where}")
        for name in schema.missing(update.fields):
            problems.append(f"field {name!r} is not a field of {where}")
        for sub in update.subprofiles:
            if isinstance(sub, Skipped):
                continue
            names = [n for n, _ in sub.selector] + list(sub.fields)
            missing = schema.missing_in_collection(sub.collection, names)
            if missing is None:
                problems.append(f"{where} has no collection {sub.collection!r}")
            for name in missing or ():
                problems.append(
                    f"field {name!r} is not a field of collection {sub.collection!r}"
                )
        return sorted(set(problems))

    # -- logging --------------------------------------------------------------

    def log(self, event: str, level: int = logging.INFO, **more) -> None:
        log.log(level, event, extra={"fields": {**self.attempt.facts, **more}})


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
    run = Run(ctx, attempt, job.connection if job else None, job)

    started = time.monotonic()
    # How this run ended, for its log line and the metrics; anything not
    # caught below leaves the job in RQ's failed registry.
    ending = ("failed", "error")
    finished = False
    try:
        if (
            delivery.source == "shopify"
            and delivery.topic in privacy_topics.PRIVACY_TOPICS
        ):
            result = _privacy(run, delivery)
        else:
            result = _deliver(run, delivery)
        finished = True
        ending = ending_of(result, run.skips)
        return result
    except ComeBack as back:
        ending = (back.outcome, back.reason)
        return back.retry
    except (JobTimeoutException, redis.RedisError) as error:
        # Cut off by RQ's time limit (a trickling answer, a stuck call), or
        # Redis hiccupped mid-delivery (a lock, a mark, the field cache): the
        # delivery has not failed; try again on the schedule.
        reason = (
            "the job's time limit ran out"
            if isinstance(error, JobTimeoutException)
            else f"Redis: {type(error).__name__}"
        )
        try:
            run.require(Answer(status=0, message=reason), "delivery")
        except ComeBack as back:
            cause = "timeout" if isinstance(error, JobTimeoutException) else "redis"
            ending = (back.outcome, cause)
            return back.retry
        except DeliveryFailed as failed:
            ending = ("failed", failed.kind)
            _record_failure(meta, failed)
            raise
    except DeliveryFailed as failed:
        ending = ("failed", failed.kind)
        _record_failure(meta, failed)
        raise
    finally:
        _report(run, ending, started)
        # What a later run needs (calls applied, failures counted) is saved
        # only when there will be a later run: a retry, or a replay.
        if job and not finished:
            meta["failures"] = attempt.failures
            meta["attempts"] = attempt.facts["attempt"]
            try:
                job.save_meta()
            except redis.RedisError:
                # Redis is away; the job's next run counts from what was saved
                # before, which at worst repeats a call already applied.
                run.log(
                    "job progress not saved", outcome="unsaved", level=logging.WARNING
                )


def ending_of(result: dict[str, Any], skips: list[str]) -> tuple[str, str]:
    """A finished run's outcome and reason, each one word from a fixed list.

    ``skips`` are the reasons rules were skipped in this run, in order.
    """
    overall = result.get("outcome")
    outcomes = {call.get("outcome") for call in result.get("calls", ())}
    if overall == "unmapped":
        return "skipped", "unmapped"
    if "applied" in outcomes or overall in ("applied", "redacted", "acknowledged"):
        return "applied", ""
    if "dry_run" in outcomes or overall == "dry_run":
        return "dry_run", ""
    return "skipped", skips[0] if skips else "other"


def _report(run: Run, ending: tuple[str, str], started: float) -> None:
    """The run's one summary line, and its counts for the metrics."""
    outcome, reason = ending
    facts = run.attempt.facts
    lag = None
    if outcome == "applied" and run.attempt.event_time is not None:
        lag = time.time() - run.attempt.event_time
    RECORDER.delivery(facts["source"], facts["topic"], outcome, reason, lag)
    run.log(
        "delivery attempt ended",
        # Throttled runs come back every second or two while Copernica is
        # slow; at INFO they would drown everything else.
        level=logging.DEBUG if reason == "throttled" else logging.INFO,
        outcome=outcome,
        reason=reason or None,
        duration_ms=round((time.monotonic() - started) * 1000),
        calls=run.attempt.calls,
        lag_s=None if lag is None else round(lag, 3),
    )


def _record_failure(meta: dict[str, Any], failed: DeliveryFailed) -> None:
    meta["reason"] = str(failed)
    meta["failed_at"] = datetime.now(UTC).isoformat(timespec="seconds")


def _deliver(run: Run, delivery: Delivery) -> dict[str, Any]:
    try:
        outcomes = apply_rules(
            run.ctx.rules, delivery.source, delivery.topic, delivery.body
        )
    except MappedValueError as error:
        run.fail("mapping", str(error), None, kind="mapping")

    if not outcomes:
        run.log("delivery unmapped", outcome="unmapped")
        return {"outcome": "unmapped", "calls": []}

    results = []
    for outcome in outcomes:
        if isinstance(outcome, Skipped):
            results.append(
                _skipped(run, "rule skipped", outcome.rule, outcome.reason, "no_key")
            )
        elif run.client is None:
            results.extend(_dry_run(run, outcome))
        else:
            results.extend(_update_profile(run, outcome))
    return {"outcome": _overall(results), "calls": results}


def _dry_run(run: Run, update: ProfileUpdate) -> list[dict[str, Any]]:
    database = update.database or UNSET_DATABASE
    call = run.api.profile_put(
        database, update.selector, update.fields, update.create, update.async_
    )
    run.log(
        "dry run: request not sent",
        rule=update.rule,
        outcome="dry_run",
        method=call.method,
        path=call.path,
        selector=mask_selector(update.selector),
        create=update.create,
        body=mask_fields(update.fields),
        **{"async": update.async_},
    )
    results = [{"rule": update.rule, "outcome": "dry_run", "request": call.describe()}]
    for sub in update.subprofiles:
        if isinstance(sub, SubprofileUpdate):
            run.log(
                "dry run: subprofile request not sent",
                rule=f"{update.rule}/{sub.collection}",
                outcome="dry_run",
                collection=sub.collection,
                selector=mask_selector(sub.selector),
            )
            sub_call = run.api.subprofile_put(
                "{profile}", sub.collection, sub.selector, sub.fields
            )
            results.append(
                {
                    "rule": f"{update.rule}/{sub.label}",
                    "outcome": "dry_run",
                    "request": sub_call.describe(),
                }
            )
    return results


def _update_profile(run: Run, update: ProfileUpdate) -> list[dict[str, Any]]:
    """The profile PUT, then its subprofiles, holding the profile's lock."""
    attempt, settings = run.attempt, run.settings
    database = update.database or UNSET_DATABASE
    labels = [update.rule] + [
        f"{update.rule}/{sub.label}"
        for sub in update.subprofiles
        if isinstance(sub, SubprofileUpdate)
    ]
    if all(label in attempt.done for label in labels):
        return [attempt.done[label] for label in labels]

    guard = ProfileGuard(
        run.connection,
        database,
        update.selector,
        lock_seconds=settings.job_timeout_seconds + LOCK_GRACE_SECONDS,
        mark_ttl_seconds=settings.order_ttl_seconds,
    )
    # The lock, the order marks and the cached field list in one round trip.
    held = guard.hold(labels, read=(run.schemas.key(database),))
    if held is None:
        # Another delivery is writing this profile; two create=1 PUTs at once
        # could create it twice. Come back shortly, not as a failure.
        delay = PROFILE_BUSY_DELAY_SECONDS + random.randint(
            0, PROFILE_BUSY_DELAY_SECONDS
        )
        run.log(
            "profile busy, delivery comes back shortly",
            rule=update.rule,
            outcome="busy",
            retry_in_s=delay,
        )
        raise ComeBack(Retry(max=RQ_RETRY_CEILING, interval=delay))
    try:
        # Checked under the lock: a delivery for a field the database lacks
        # fails for good here, and the lock is released on the way out.
        run.check_fields(update.rule, database, update, cached=held[0])
        results = [_profile_put(run, database, update, guard)]
        profile_id = results[0].get("created_id")
        looked_up = False  # one look-up serves every subprofile
        for sub in update.subprofiles:
            if isinstance(sub, Skipped):
                results.append(
                    _skipped(run, "subprofile skipped", sub.rule, sub.reason, "no_key")
                )
                continue
            if (
                profile_id is None
                and not looked_up
                and f"{update.rule}/{sub.label}" not in attempt.done
            ):
                profile_id = _profile_id(run, database, update)
                looked_up = True
            results.append(_subprofile_put(run, update, sub, profile_id, guard))
    finally:
        if run.write_in_doubt:
            # The last write got no answer but may still be applied by
            # Copernica. Releasing now would let a newer event through first,
            # and the late write would undo it (or, with create=1, make a
            # second profile). The lock expires by itself instead.
            run.log(
                "profile lock kept until it expires: a timed-out write may still land",
                rule=update.rule,
                outcome="lock_kept",
            )
        _finish(run, guard, release=not run.write_in_doubt)
    return results


def _finish(run: Run, guard: ProfileGuard, release: bool) -> None:
    """Raise the marks of the calls applied and release the lock, in one step."""
    try:
        guard.finish(release)
    except redis.RedisError:
        # Their marks are not raised: the next run applies these calls again
        # (as it would had Redis failed right after the call) and then marks
        # them, rather than leaving an older event free to overwrite them.
        for label in guard.pending():
            run.attempt.done.pop(label, None)
        raise


def _profile_put(
    run: Run, database: str, update: ProfileUpdate, guard: ProfileGuard
) -> dict[str, Any]:
    attempt = run.attempt
    if update.rule in attempt.done:
        return attempt.done[update.rule]

    stale = _stale(run, guard, update.rule)
    if stale:
        result = _skipped(run, "rule skipped", update.rule, stale, "older_event")
    else:
        call = run.api.profile_put(
            database, update.selector, update.fields, update.create, update.async_
        )
        answer = run.require(run.send(call, update.rule), update.rule, database)
        _applied(run, guard, update.rule)
        run.log(
            "profile updated",
            rule=update.rule,
            outcome="applied",
            status=answer.status,
            created_id=answer.created_id,
            duration_ms=run.last_duration_ms,
        )
        result = {
            "rule": update.rule,
            "outcome": "applied",
            "status": answer.status,
            "created_id": answer.created_id,
            "request": call.describe(),
        }
    attempt.done[update.rule] = result
    return result


def _subprofile_put(
    run: Run,
    update: ProfileUpdate,
    sub: SubprofileUpdate,
    profile_id: str | None,
    guard: ProfileGuard,
) -> dict[str, Any]:
    attempt = run.attempt
    label = f"{update.rule}/{sub.label}"
    if label in attempt.done:
        return attempt.done[label]

    stale = _stale(run, guard, label)
    if profile_id is None:
        reason = "no profile matches the selector to attach it to"
        result = _skipped(run, "subprofile skipped", label, reason, "no_profile")
    elif stale:
        result = _skipped(run, "subprofile skipped", label, stale, "older_event")
    else:
        call = run.api.subprofile_put(
            profile_id, sub.collection, sub.selector, sub.fields
        )
        answer = run.require(
            run.send(call, label), label, update.database or UNSET_DATABASE
        )
        _applied(run, guard, label)
        run.log(
            "subprofile updated",
            rule=label,
            outcome="applied",
            status=answer.status,
            duration_ms=run.last_duration_ms,
        )
        result = {
            "rule": label,
            "outcome": "applied",
            "status": answer.status,
            "profile_id": profile_id,
            "request": call.describe(),
        }
    attempt.done[label] = result
    return result


def _profile_id(run: Run, database: str, update: ProfileUpdate) -> str | None:
    """The id of the one profile the selector matches; None if there is none."""
    call = run.api.profiles_get(database, update.selector, limit=2)
    answer = run.require(run.send(call, update.rule), update.rule)
    data = answer.data.get("data") if isinstance(answer.data, dict) else None
    matches = [item for item in data or () if isinstance(item, dict)]
    if len(matches) > 1:
        run.fail(
            update.rule,
            "the selector matches more than one profile; "
            "merge them in Copernica, then requeue",
            None,
            kind="ambiguous_profile",
        )
    return str(matches[0]["ID"]) if matches else None


def _stale(run: Run, guard: ProfileGuard, label: str) -> str | None:
    """Why this event must not be applied, if a newer one already was."""
    moment = run.attempt.event_time
    if moment is None:
        return None
    mark = guard.mark(label)
    if mark is not None and moment < mark:
        return (
            f"older than the newest event applied to this profile "
            f"({_iso(moment)} < {_iso(mark)})"
        )
    # The same time is checked further: only this very delivery, sent again
    # after the dedupe window, is stale; another event of that second is not.
    if mark == moment and guard.marked_by(label, _delivery_name(run)):
        return "this delivery was already applied to this profile (a replay)"
    return None


def _delivery_name(run: Run) -> str:
    facts = run.attempt.facts
    return f"{facts['source']}\n{facts['delivery']}"


def _applied(run: Run, guard: ProfileGuard, label: str) -> None:
    # Noted only now that Copernica took the PUT: a failed call must not
    # make the retry of this very event look stale. The mark is written when
    # the lock is released, in the same round trip.
    if run.attempt.event_time is not None:
        guard.applied(label, run.attempt.event_time, _delivery_name(run))


def _privacy(run: Run, delivery: Delivery) -> dict[str, Any]:
    body = delivery.body
    shop = body.get("shop_domain") if isinstance(body.get("shop_domain"), str) else None
    queue = (
        Queue(run.job.origin, connection=run.connection, serializer=run.job.serializer)
        if run.job
        else None
    )
    keep = run.job.id if run.job else None

    if delivery.topic == "customers/data_request":
        run.log("data request acknowledged", outcome="acknowledged")
        return {"outcome": "acknowledged", "calls": []}

    shop = shop or delivery.account
    if delivery.topic == "shop/redact":
        erased = privacy_topics.erase_copies(queue, shop, None, keep)
        run.log(
            "shop redacted",
            outcome="redacted" if shop else "skipped",
            local_copies_erased=erased,
            reason=None if shop else "the request names no shop",
        )
        return {"outcome": "redacted", "local_copies_erased": erased, "calls": []}

    return _redact_customer(run, delivery, queue, shop, keep)


def _redact_customer(run, delivery, queue, shop, keep) -> dict[str, Any]:
    privacy = run.ctx.privacy
    try:
        selectors = privacy_selectors(privacy, delivery.body)
    except MappedValueError as error:
        run.fail("privacy", str(error), None, kind="mapping")
    needles = [value for selector in selectors for _, value in selector]
    results = []
    if not selectors:
        reason = "no usable customer id or email in the request"
        results.append(
            _skipped(
                run, "customer redaction skipped", "privacy", reason, "no_customer"
            )
        )
    elif run.client is None:
        run.log(
            "dry run: customer redaction not sent",
            outcome="dry_run",
            action=privacy.action,
            matched_by=[s[0][0] for s in selectors],
        )
        results.append(
            {"rule": "privacy", "outcome": "dry_run", "action": privacy.action}
        )
    elif "privacy" in run.attempt.done:
        results.append(run.attempt.done["privacy"])
    else:
        results.append(_redact_profiles(run, privacy, selectors))

    erased = privacy_topics.erase_copies(queue, shop, needles, keep)
    run.log(
        "customer redacted",
        outcome=_overall(results),
        local_copies_erased=erased,
        profiles=results[0].get("profiles", 0),
        action=privacy.action,
    )
    return {
        "outcome": _overall(results),
        "local_copies_erased": erased,
        "calls": results,
    }


def _redact_profiles(run: Run, privacy: PrivacyRule, selectors) -> dict[str, Any]:
    database = privacy.database or UNSET_DATABASE
    check = ProfileUpdate(
        "privacy", database, (), {name: "" for name in privacy.clear}, False, False
    )
    run.check_fields("privacy", database, check)
    for selector in selectors:
        run.check_fields(
            "privacy",
            database,
            ProfileUpdate("privacy", database, selector, {}, False, False),
        )

    # The customer's profiles are held like any delivery holds them, so a
    # delivery for the same customer still in flight finishes first (and is
    # then cleared), instead of writing the data back right after.
    guards = []
    try:
        for selector in selectors:
            guard = ProfileGuard(
                run.connection,
                database,
                selector,
                lock_seconds=run.settings.job_timeout_seconds + LOCK_GRACE_SECONDS,
                mark_ttl_seconds=run.settings.order_ttl_seconds,
            )
            if not guard.acquire():
                run.log(
                    "profile busy, redaction comes back shortly",
                    rule="privacy",
                    outcome="busy",
                )
                raise ComeBack(
                    Retry(max=RQ_RETRY_CEILING, interval=PROFILE_BUSY_DELAY_SECONDS)
                )
            guards.append(guard)
        return _clear_or_delete(run, privacy, database, selectors)
    finally:
        if not run.write_in_doubt:
            for guard in guards:
                guard.release()


def _clear_or_delete(run: Run, privacy: PrivacyRule, database: str, selectors):
    profile_ids: set[str] = set()
    for selector in selectors:
        start = 0
        while True:  # every page: a customer may have many profiles
            call = run.api.profiles_get(
                database, selector, limit=REDACT_PAGE, start=start
            )
            answer = run.require(run.send(call, "privacy"), "privacy")
            data = answer.data.get("data") if isinstance(answer.data, dict) else None
            page = [item for item in data or () if isinstance(item, dict)]
            profile_ids.update(str(item["ID"]) for item in page if "ID" in item)
            start += len(page)
            if len(page) < REDACT_PAGE or start >= REDACT_MAX_PROFILES:
                break

    done = run.attempt.done.setdefault("privacy-profiles", [])
    for profile_id in sorted(profile_ids - set(done)):
        if privacy.action == "delete":
            call = run.api.profile_delete(profile_id)
        else:
            call = run.api.profile_fields_put(
                profile_id, {name: "" for name in privacy.clear}
            )
        answer = run.send(call, "privacy")
        if not (
            privacy.action == "delete"
            and answer.status == 400
            and "already been removed" in (answer.message or "")
        ):
            run.require(answer, "privacy")
        done.append(profile_id)

    result = {
        "rule": "privacy",
        "outcome": "applied",
        "action": privacy.action,
        "profiles": len(set(done) | profile_ids),
    }
    run.attempt.done["privacy"] = result
    return result


def _skipped(run: Run, event: str, rule: str, reason: str, kind: str) -> dict[str, Any]:
    run.skips.append(kind)
    run.log(event, rule=rule, outcome="skipped", reason=reason)
    return {"rule": rule, "outcome": "skipped", "reason": reason}


def _overall(results: list[dict[str, Any]]) -> str:
    outcomes = {result["outcome"] for result in results}
    return outcomes.pop() if len(outcomes) == 1 else "mixed"


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")
