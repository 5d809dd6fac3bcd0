"""``POST /webhooks/<source>``: verify, store, answer, in that order and nothing more.

The answers are the contract with the sender: 2xx only once the event is in
Redis, 401 for any signature problem, 400 for a body that is not a JSON
object, 413 above the size limit (checked before hashing), 503 when the event
could not be stored or the source has no secret, so the sender retries.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

import redis
from flask import Blueprint, Response, current_app, request

from app import intake
from app.deliveries import BUILDERS, DeliveryError, parse_body
from app.signatures import verify_shopify, verify_typeform
from worker.privacy import PRIVACY_TOPICS

bp = Blueprint("webhooks", __name__)

log = logging.getLogger("relay.web")

VERIFIERS = {
    "shopify": (verify_shopify, "X-Shopify-Hmac-Sha256"),
    "typeform": (verify_typeform, "Typeform-Signature"),
}


@bp.post("/webhooks/<source>")
def receive(source: str):
    started = time.monotonic()
    relay = current_app.extensions["relay"]
    settings = relay["settings"]
    if source not in VERIFIERS:
        return _answer(404, "unknown source", source, started)

    secrets = settings.secrets_for(source)
    if not secrets:
        return _answer(503, f"no {source} secret configured", source, started)

    try:
        body = _read_body(settings.max_body_bytes)
    except Exception:
        # A broken chunked encoding or a client gone mid-body: nothing to
        # verify, and no reason to log a traceback for it.
        return _answer(400, "body could not be read", source, started)
    if body is None:
        return _answer(
            413, "body too large", source, started, limit=settings.max_body_bytes
        )

    verify, header = VERIFIERS[source]
    if not verify(secrets, body, request.headers.get(header)):
        return _answer(401, "signature missing or wrong", source, started)

    payload = parse_body(body)
    if payload is None:
        return _answer(400, "body is not a JSON object", source, started)

    received_at = datetime.now(UTC).isoformat(timespec="microseconds")
    try:
        delivery = BUILDERS[source](request.headers, payload, body, received_at)
    except DeliveryError as error:
        return _answer(400, str(error), source, started)

    try:
        stored = intake.store(
            relay["queue"],
            delivery,
            dedupe_ttl=settings.dedupe_ttl_seconds,
            # A privacy request names the customer; once done, it is not
            # kept around as a finished job.
            result_ttl=0
            if delivery.source == "shopify" and delivery.topic in PRIVACY_TOPICS
            else settings.result_ttl_seconds,
            failure_ttl=settings.failed_ttl_seconds,
            job_timeout=settings.job_timeout_seconds,
        )
    except redis.RedisError as error:
        return _answer(
            503,
            "event could not be stored, retry later",
            source,
            started,
            delivery=delivery.delivery_id,
            topic=delivery.topic,
            cause=type(error).__name__,
        )

    status = 200 if stored.duplicate else 202
    return _answer(
        status,
        "duplicate" if stored.duplicate else "queued",
        source,
        started,
        delivery=delivery.delivery_id,
        topic=delivery.topic,
        job=stored.job_id,
    )


def _read_body(limit: int) -> bytes | None:
    """The raw body, or None when it exceeds ``limit`` bytes."""
    # A declared length over the limit is refused before reading anything.
    if request.content_length is not None and request.content_length > limit:
        return None
    # A chunked body has no declared length: read one byte past the limit.
    body = request.stream.read(limit + 1)
    return None if len(body) > limit else body


def _answer(status: int, outcome: str, source: str, started: float, **facts):
    duration_ms = round((time.monotonic() - started) * 1000, 2)
    level = logging.INFO if status < 400 else logging.WARNING
    log.log(
        level,
        "webhook %s",
        outcome,
        extra={
            "fields": {
                "source": source,
                "status": status,
                "outcome": outcome,
                "duration_ms": duration_ms,
                **facts,
            }
        },
    )

    body = {"status": outcome}
    for name in ("delivery", "topic", "job", "limit"):
        if name in facts:
            body[name] = facts[name]
    if status >= 400:
        body["error"] = outcome
    # The bytes jsonify() gives, without its per-call provider lookups.
    text = json.dumps(body, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return Response(text + "\n", status, mimetype="application/json")
