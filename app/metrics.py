"""Metrics: counted in memory by each process, summed in Redis, read at a scrape.

Every web and worker process counts what it does in memory, so a webhook or a
delivery costs no Redis call for its metrics. A daemon thread adds what was
counted since its last turn to one Redis hash every FLUSH_INTERVAL_SECONDS, in
one pipeline, and once more when the process exits cleanly. ``GET /metrics``
(app/metrics_view.py) reads that hash and the queue's figures from Redis and
renders them, so any web process on any host answers with the totals of every
web and worker process. A process killed outright loses its last interval.

The same flush writes the per-minute series the operator's page draws:
``relay:metrics:minute:{kind}:{unix_minute}`` for ``received`` (webhooks
queued, duplicates left out) and ``delivered`` (deliveries that finished
applied or skipped), kept for two hours.

Label values are bounded: a source or topic the relay does not know becomes
``other``, so a sender cannot grow the hash or Prometheus' series at will.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

log = logging.getLogger("relay.metrics")

#: One hash holds every counter and histogram of every process. The version
#: changes with the bucket layout, so old and new buckets never mix.
METRICS_KEY = "relay:metrics:v1"
MINUTE_PREFIX = "relay:metrics:minute:"
MINUTE_KINDS = ("received", "delivered")
MINUTE_TTL_SECONDS = 7200

#: How often each process adds its counts to Redis: short against a 15 s or
#: longer scrape interval, long enough to cost Redis next to nothing.
FLUSH_INTERVAL_SECONDS = 2.0

OTHER = "other"


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # "counter" or "histogram"
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()


WEBHOOKS = Spec(
    "relay_webhooks_received",
    "counter",
    ("source", "topic", "outcome", "reason"),
    "Webhooks answered, by outcome (queued, duplicate, rejected) and the "
    "reason for a rejection.",
)
ACK_SECONDS = Spec(
    "relay_webhook_ack_seconds",
    "histogram",
    ("source", "outcome"),
    "Time from a webhook request's start to its answer.",
    (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DELIVERIES = Spec(
    "relay_deliveries",
    "counter",
    ("source", "topic", "outcome", "reason"),
    "Delivery job runs, by how they ended: applied, skipped, dry_run, "
    "retried, deferred or failed, with a reason.",
)
CALLS = Spec(
    "relay_copernica_calls",
    "counter",
    ("method", "status_class"),
    "Calls to Copernica, by HTTP method and answer class (2xx to 5xx, or "
    "error when no answer came).",
)
CALL_SECONDS = Spec(
    "relay_copernica_call_seconds",
    "histogram",
    ("method",),
    "Time a Copernica call took, answer included.",
    (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0),
)
LAG_SECONDS = Spec(
    "relay_delivery_lag_seconds",
    "histogram",
    ("source",),
    "Time from the event's own time (the one used for ordering) to the end "
    "of its applied delivery.",
    (1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 7200, 21600, 86400, 172800),
)
SPECS = {
    spec.name: spec
    for spec in (WEBHOOKS, ACK_SECONDS, DELIVERIES, CALLS, CALL_SECONDS, LAG_SECONDS)
}

#: Read from Redis at scrape time, not counted by the processes.
GAUGES = {
    "relay_queue_depth": "Deliveries waiting in the queue.",
    "relay_queue_oldest_age_seconds": "How long the oldest waiting delivery "
    "has been in the queue (0 when the queue is empty).",
    "relay_retries_scheduled": "Deliveries waiting for a scheduled retry.",
    "relay_deliveries_in_progress": "Deliveries a worker is running now.",
    "relay_deliveries_failed": "Failed deliveries kept for replay.",
    "relay_workers": "Worker processes alive on the queue.",
}

HTTP_METHODS = ("GET", "PUT", "POST", "DELETE")


def status_class(status: int | None) -> str:
    """``2xx`` … ``5xx`` for an HTTP answer, ``error`` when none came."""
    if not status or not 100 <= status <= 599:
        return "error"
    return f"{status // 100}xx"


def bounded(value: str | None, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


@lru_cache(maxsize=4096)
def field_name(name: str, values: tuple[str, ...], part: str = "") -> str:
    """The hash field of one series (and of one bucket, sum or count of it)."""
    return json.dumps([name, list(values), part], separators=(",", ":"))


def histogram_parts(spec: Spec, value: float) -> list[tuple[str, float]]:
    """What one observation adds: its bucket (none past the last), sum, count."""
    parts: list[tuple[str, float]] = [("sum", float(value)), ("count", 1)]
    for bound in spec.buckets:
        if value <= bound:
            parts.append((f"le:{bound!r}", 1))
            break
    return parts


@dataclass
class Batch:
    """Counts gathered since the last flush."""

    fields: dict[str, float] = field(default_factory=dict)
    minutes: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, other: Batch) -> None:
        for name, amount in other.fields.items():
            self.fields[name] = self.fields.get(name, 0) + amount
        for key, amount in other.minutes.items():
            self.minutes[key] = self.minutes.get(key, 0) + amount

    def __bool__(self) -> bool:
        return bool(self.fields or self.minutes)


def write(pipe, batch: Batch) -> None:
    """Queue the Redis commands that add ``batch`` to the stored totals."""
    for name, amount in batch.fields.items():
        if isinstance(amount, int):
            pipe.hincrby(METRICS_KEY, name, amount)
        else:
            pipe.hincrbyfloat(METRICS_KEY, name, amount)
    for (kind, minute), amount in batch.minutes.items():
        key = minute_key(kind, minute)
        pipe.incrby(key, amount)
        pipe.expire(key, MINUTE_TTL_SECONDS)


def minute_key(kind: str, minute: int) -> str:
    """The counter of ``kind`` events in one minute (unix time // 60); the
    admin page's chart reads these."""
    return f"{MINUTE_PREFIX}{kind}:{minute}"


class Recorder:
    """One process's counts, added to Redis by a daemon thread."""

    def __init__(self, interval: float = FLUSH_INTERVAL_SECONDS):
        self.interval = interval
        self.topics: Mapping[str, frozenset[str]] = {}
        self._connection: redis.Redis | None = None
        self._reset()

    def _reset(self) -> None:
        # Also run in a forked child: the parent's counts and thread are its
        # own (gunicorn forks its workers from the master that built the app).
        self._lock = threading.Lock()
        self._batch = Batch()
        self._thread: threading.Thread | None = None
        self._failing = False

    def bind(self, connection: redis.Redis, topics=None) -> None:
        """Flush to ``connection`` from now on; ``topics`` bounds the labels."""
        self._connection = connection
        if topics is not None:
            self.topics = topics

    # -- what the relay counts ------------------------------------------------

    def webhook(
        self,
        source: str,
        topic: str | None,
        outcome: str,
        reason: str,
        seconds: float | None,
    ) -> None:
        source_label = bounded(source, self.topics)
        topic_label = (
            bounded(topic, self.topics.get(source, ())) if topic else "unknown"
        )
        self.count(WEBHOOKS, (source_label, topic_label, outcome, reason))
        if seconds is not None:
            self.observe(ACK_SECONDS, (source_label, outcome), seconds)
        if outcome == "queued":
            self.tick("received")

    def delivery(
        self,
        source: str,
        topic: str,
        outcome: str,
        reason: str,
        lag_seconds: float | None = None,
    ) -> None:
        source_label = bounded(source, self.topics)
        topic_label = bounded(topic, self.topics.get(source, ()))
        self.count(DELIVERIES, (source_label, topic_label, outcome, reason))
        if lag_seconds is not None:
            self.observe(LAG_SECONDS, (source_label,), max(0.0, lag_seconds))
        if outcome in ("applied", "skipped"):
            self.tick("delivered")

    def call(self, method: str, status: int | None, seconds: float) -> None:
        method_label = bounded(method, HTTP_METHODS)
        self.count(CALLS, (method_label, status_class(status)))
        self.observe(CALL_SECONDS, (method_label,), seconds)

    # -- aggregation ----------------------------------------------------------

    def count(self, spec: Spec, values: tuple[str, ...], amount: int = 1) -> None:
        self._add([(field_name(spec.name, values), amount)])

    def observe(self, spec: Spec, values: tuple[str, ...], value: float) -> None:
        self._add(
            [
                (field_name(spec.name, values, part), amount)
                for part, amount in histogram_parts(spec, value)
            ]
        )

    def tick(self, kind: str, moment: float | None = None) -> None:
        minute = int((time.time() if moment is None else moment) // 60)
        with self._lock:
            key = (kind, minute)
            self._batch.minutes[key] = self._batch.minutes.get(key, 0) + 1
        self._start()

    def _add(self, parts: list[tuple[str, float]]) -> None:
        with self._lock:
            fields = self._batch.fields
            for name, amount in parts:
                fields[name] = fields.get(name, 0) + amount
        self._start()

    def take(self) -> Batch:
        with self._lock:
            batch, self._batch = self._batch, Batch()
        return batch

    def give_back(self, batch: Batch) -> None:
        # While Redis is away, minutes the series no longer keep are dropped,
        # so a long outage does not grow the batch minute by minute.
        oldest = int(time.time() // 60) - MINUTE_TTL_SECONDS // 60
        batch.minutes = {
            key: amount for key, amount in batch.minutes.items() if key[1] >= oldest
        }
        with self._lock:
            batch.add(self._batch)
            self._batch = batch

    # -- flushing -------------------------------------------------------------

    def flush(self) -> bool:
        """Add the counts so far to Redis; on failure keep them for next time."""
        connection = self._connection
        batch = self.take()
        if connection is None or not batch:
            if batch:
                self.give_back(batch)
            return not batch
        try:
            with connection.pipeline(transaction=False) as pipe:
                write(pipe, batch)
                pipe.execute()
        except redis.RedisError as error:
            self.give_back(batch)
            if not self._failing:
                self._failing = True
                log.warning(
                    "metrics not saved, kept for the next try",
                    extra={"fields": {"cause": type(error).__name__}},
                )
            return False
        if self._failing:
            self._failing = False
            log.info("metrics saved again")
        return True

    def _start(self) -> None:
        if self._thread is not None or self._connection is None:
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._loop, name="relay-metrics", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        me = self._thread
        while self._thread is me:
            time.sleep(self.interval)
            try:
                self.flush()
            except Exception:
                # The thread must outlive any surprise; the counts stay.
                log.exception("metrics flush failed")


#: The process's recorder. Web and worker bind it to their Redis at start.
RECORDER = Recorder()
os.register_at_fork(after_in_child=RECORDER._reset)
atexit.register(RECORDER.flush)


def known_topics(rules) -> dict[str, frozenset[str]]:
    """Topic labels per source: the mapping's topics and the privacy topics."""
    from app.settings import SOURCES
    from worker.privacy import PRIVACY_TOPICS

    topics: dict[str, set[str]] = {source: set() for source in SOURCES}
    topics["shopify"].update(PRIVACY_TOPICS)
    for rule in rules:
        topics.setdefault(rule.source, set()).update(rule.topics)
    return {source: frozenset(names) for source, names in topics.items()}


# -- reading at scrape time -----------------------------------------------------


def queue_gauges(connection: redis.Redis, queue_name: str, now: float) -> dict:
    """The queue's figures, read in two round trips without changing anything."""
    from rq import Queue
    from rq.worker_registration import WORKERS_BY_QUEUE_KEY

    queue = Queue(queue_name, connection=connection)
    with connection.pipeline(transaction=False) as pipe:
        pipe.llen(queue.key)
        pipe.zcard(ScheduledJobRegistry(queue=queue).key)
        # Both registries score an entry by when it expires; RQ removes the
        # expired ones only when it cleans up, which a scrape must not do.
        pipe.zcount(StartedJobRegistry(queue=queue).key, now, "+inf")
        pipe.zcount(FailedJobRegistry(queue=queue).key, now, "+inf")
        # RQ appends to the right and takes from the left.
        pipe.lrange(queue.key, 0, 4)
        pipe.smembers(WORKERS_BY_QUEUE_KEY % queue_name)
        depth, scheduled, started, failed, first_ids, workers = pipe.execute()

    # A worker's own key expires when it stops renewing it, while its entry
    # in the set stays until RQ cleans up: only the keys count.
    workers = sorted(workers)
    with connection.pipeline(transaction=False) as pipe:
        for job_id in first_ids:
            pipe.hget(f"rq:job:{job_id.decode()}", "enqueued_at")
        for worker_key in workers:
            pipe.exists(worker_key)
        answers = pipe.execute() if first_ids or workers else []
    stamps, alive = answers[: len(first_ids)], answers[len(first_ids) :]

    age = 0.0
    for stamp in stamps:
        moment = _rq_time(stamp)
        if moment is not None:
            age = max(0.0, now - moment)
            break
    return {
        "relay_queue_depth": depth,
        "relay_queue_oldest_age_seconds": age,
        "relay_retries_scheduled": scheduled,
        "relay_deliveries_in_progress": started,
        "relay_deliveries_failed": failed,
        "relay_workers": sum(1 for exists in alive if exists),
    }


def _rq_time(raw: bytes | None) -> float | None:
    if not raw:
        return None
    try:
        moment = datetime.strptime(raw.decode(), "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC).timestamp()


def families(stored: Mapping[Any, Any], gauges: Mapping[str, float]) -> list[Metric]:
    """Prometheus metric families from the stored hash and the queue gauges."""
    counters: dict[str, dict[tuple, float]] = {}
    histograms: dict[str, dict[tuple, dict[str, float]]] = {}
    for raw_name, raw_value in stored.items():
        try:
            name, values, part = json.loads(_text(raw_name))
            amount = float(_text(raw_value))
        except (ValueError, TypeError):
            continue
        spec = SPECS.get(name)
        if spec is None or len(values) != len(spec.labels):
            continue  # written by another version of the relay
        if spec.kind == "counter":
            counters.setdefault(name, {})[tuple(values)] = amount
        else:
            series = histograms.setdefault(name, {}).setdefault(tuple(values), {})
            series[part] = amount

    result: list[Metric] = []
    for spec in SPECS.values():
        if spec.kind == "counter":
            family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
            for values, amount in sorted(counters.get(spec.name, {}).items()):
                family.add_metric(values, amount)
        else:
            family = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
            for values, parts in sorted(histograms.get(spec.name, {}).items()):
                family.add_metric(
                    values,
                    buckets=_cumulative(spec, parts),
                    sum_value=parts.get("sum", 0.0),
                )
        result.append(family)

    for name, help_text in GAUGES.items():
        if name in gauges:
            family = GaugeMetricFamily(name, help_text)
            family.add_metric((), gauges[name])
            result.append(family)
    return result


def _cumulative(spec: Spec, parts: Mapping[str, float]) -> list[tuple[str, float]]:
    running = 0.0
    buckets = []
    for bound in spec.buckets:
        running += parts.get(f"le:{bound!r}", 0.0)
        buckets.append((_bound_text(bound), running))
    # Observations past the last bound are counted only in the total.
    buckets.append(("+Inf", max(running, parts.get("count", 0.0))))
    return buckets


def _bound_text(bound: float) -> str:
    return repr(float(bound))


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class _Snapshot:
    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


def render(stored: Mapping[Any, Any], gauges: Mapping[str, float]) -> bytes:
    """The Prometheus text exposition of the stored totals and the gauges."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families(stored, gauges)))
    return generate_latest(registry)
