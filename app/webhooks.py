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
from app.metrics import RECORDER
from app.serving import REQUEST_READ_SECONDS
from app.signatures import verify_shopify, verify_typeform
from worker.privacy import PRIVACY_TOPICS

bp = Blueprint("webhooks", __name__)

log = logging.getLogger("relay.web")

#: The whole request must arrive within this many seconds of its first byte
#: (app/serving.py enforces it on the socket). Shopify gives up on a webhook
#: after 5 s anyway; a sender slower than this is trickling, and must not
#: keep its connection (and a thread of the server) for ever.
BODY_READ_SECONDS = REQUEST_READ_SECONDS


class BodyTooSlow(Exception):
    """The body did not arrive within BODY_READ_SECONDS."""


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
        return _answer(404, "unknown source", source, started, reason="unknown_source")

    secrets = settings.secrets_for(source)
    if not secrets:
        return _answer(
            503,
            f"no {source} secret configured",
            source,
            started,
            reason="no_secret",
        )

    try:
        body = _read_body(settings.max_body_bytes)
    except BodyTooSlow:
        return _answer(
            408,
            "body not received in time",
            source,
            started,
            reason="too_slow",
            seconds=BODY_READ_SECONDS,
        )
    except Exception:
        # A broken chunked encoding or a client gone mid-body: nothing to
        # verify, and no reason to log a traceback for it.
        return _answer(
            400, "body could not be read", source, started, reason="unreadable"
        )
    if body is None:
        return _answer(
            413,
            "body too large",
            source,
            started,
            reason="too_large",
            limit=settings.max_body_bytes,
        )

    verify, header = VERIFIERS[source]
    if not verify(secrets, body, request.headers.get(header)):
        return _answer(
            401, "signature missing or wrong", source, started, reason="signature"
        )

    payload = parse_body(body)
    if payload is None:
        return _answer(
            400, "body is not a JSON object", source, started, reason="not_json"
        )

    received_at = datetime.now(UTC).isoformat(timespec="microseconds")
    try:
        delivery = BUILDERS[source](request.headers, payload, body, received_at)
    except DeliveryError as error:
        return _answer(400, str(error), source, started, reason="bad_request")

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
            reason="not_stored",
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
    # Under gunicorn the socket's reads share the request's deadline
    # (app/serving.py); a read that fails because it passed is a late body.
    client = request.environ.get("gunicorn.socket")
    try:
        body = request.stream.read(limit + 1)
    except Exception:
        if getattr(client, "expired", False):
            # Nothing more is read from it either: every later read on the
            # socket fails at once, so gunicorn does not drain the rest of
            # the body at the client's pace.
            client.answered = True
            raise BodyTooSlow from None
        raise
    return None if len(body) > limit else body


def _answer(
    status: int,
    outcome: str,
    source: str,
    started: float,
    reason: str = "",
    **facts,
):
    seconds = time.monotonic() - started
    duration_ms = round(seconds * 1000, 2)
    # The metric's outcome is one of three words; a rejection says why in
    # ``reason``, a word from a fixed list, whatever the answer's text.
    kind = "queued" if status == 202 else "duplicate" if status == 200 else "rejected"
    RECORDER.webhook(source, facts.get("topic"), kind, reason, seconds)
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
                **({"reason": reason} if reason else {}),
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
