"""``GET /metrics``: the relay's totals in Prometheus' text format.

The figures come from Redis (see app/metrics.py), so every web process of
every host answers alike, with the worker processes' figures included. When
``RELAY_METRICS_TOKEN`` is set, a scrape must send it as a Bearer token.
"""

from __future__ import annotations

import hmac
import logging
import time

import redis
from flask import Blueprint, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST

from app.metrics import METRICS_KEY, RECORDER, queue_gauges, render

bp = Blueprint("metrics", __name__)

log = logging.getLogger("relay.web")


def authorized(header: str | None, token: str) -> bool:
    """True when ``header`` is ``Bearer <token>``; compared in constant time."""
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


@bp.get("/metrics")
def metrics():
    relay = current_app.extensions["relay"]
    settings = relay["settings"]
    token = settings.metrics_token
    if token and not authorized(request.headers.get("Authorization"), token):
        return Response(
            "unauthorized\n",
            401,
            {"WWW-Authenticate": 'Bearer realm="metrics"'},
            mimetype="text/plain",
        )

    # This process's latest counts go in first, so a scrape right after a
    # webhook it answered already shows it.
    RECORDER.flush()
    connection = relay["redis"]
    try:
        stored = connection.hgetall(METRICS_KEY)
        gauges = queue_gauges(connection, settings.queue_name, time.time())
    except redis.RedisError as error:
        log.warning(
            "metrics unavailable: Redis did not answer",
            extra={"fields": {"cause": type(error).__name__}},
        )
        return Response("metrics unavailable: Redis\n", 503, mimetype="text/plain")
    return Response(render(stored, gauges), 200, content_type=CONTENT_TYPE_LATEST)
