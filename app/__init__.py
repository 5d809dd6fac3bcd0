"""The web process: receives signed webhooks and queues them for the workers.

``create_app`` reads and checks the configuration and the mapping once, so a
bad deployment stops at start with one readable message instead of failing
requests later. Gunicorn serves ``app:create_app()``; the Flask CLI
(``flask --app app ...``) offers the operator commands.
"""

from __future__ import annotations

import logging
import sys

import redis
from flask import Flask, jsonify, request
from rq import Queue
from rq.serializers import JSONSerializer
from werkzeug.exceptions import HTTPException

from app.connections import (
    WEB_SOCKET_TIMEOUT_SECONDS,
    EvictionPolicyRefused,
    check_eviction_policy,
    connect_with,
    explain,
)
from app.logs import configure_logging
from app.metrics import RECORDER, known_topics
from app.settings import SOURCES, ConfigurationError, Settings, load_settings
from worker.mapping import MappingError, load_rules

log = logging.getLogger("relay.web")


def create_app(
    settings: Settings | None = None, announce: bool = True, check_redis: bool = True
) -> Flask:
    """The web app; ``check_redis=False`` for operator commands that may not
    need Redis at all (``check`` reads the policy itself)."""
    configure_logging()
    try:
        settings = settings or load_settings()
        rules = load_rules(settings)
    except (ConfigurationError, MappingError) as error:
        # Gunicorn would print a long traceback for an exception here; the
        # operator needs only the list of problems.
        sys.stderr.write(f"relay not started: {error}\n")
        raise SystemExit(2) from None

    app = Flask(__name__)
    connection = connect_with(settings, socket_timeout=WEB_SOCKET_TIMEOUT_SECONDS)
    if check_redis:
        _check_redis(connection, settings)
        # Under gunicorn this ran in the master: its processes open their own.
        connection.connection_pool.disconnect()
    app.extensions["relay"] = {
        "settings": settings,
        "rules": rules,
        "redis": connection,
        "queue": Queue(
            settings.queue_name, connection=connection, serializer=JSONSerializer
        ),
    }

    # Counts are kept in memory and added to Redis by a thread, so a webhook
    # costs no Redis call for them (see app/metrics.py).
    RECORDER.bind(connection, known_topics(rules))

    from app import admin, cli, health, metrics_view, webhooks

    app.register_blueprint(webhooks.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics_view.bp)
    app.register_blueprint(admin.bp)
    cli.init_app(app)
    app.register_error_handler(Exception, _unexpected_error)

    for source in SOURCES:
        if announce and not settings.secrets_for(source):
            log.warning(
                "no %s secret configured: /webhooks/%s answers 503 to everything",
                source,
                source,
                extra={
                    "fields": {
                        "source": source,
                        "setting": f"{source.upper()}_WEBHOOK_SECRET",
                    }
                },
            )
    return app


def _check_redis(connection, settings: Settings) -> None:
    try:
        check_eviction_policy(connection, settings.allow_eviction)
    except EvictionPolicyRefused as refused:
        sys.stderr.write(f"relay not started: {refused}\n")
        raise SystemExit(2) from None
    except redis.RedisError as error:
        # Start anyway: webhooks are answered 503 (and senders retry) until
        # Redis answers, and the workers check the policy before they take a
        # job. Refusing to start would turn a Redis restart into a web outage.
        log.warning(
            "Redis not reachable at start; webhooks are answered 503 until it "
            "is, and its maxmemory-policy was not checked",
            extra={"fields": {"error": explain(error)}},
        )


def _unexpected_error(error: Exception):
    # Anything unforeseen is answered 503, never 500: the event was not
    # stored, and a 503 makes the sender try again later.
    if isinstance(error, HTTPException):
        return error
    source = request.view_args.get("source") if request.view_args else None
    if request.blueprint == "webhooks" and source:
        RECORDER.webhook(source, None, "rejected", "error", None)
    log.exception(
        "request failed unexpectedly",
        extra={"fields": {"path": request.path, "method": request.method}},
    )
    return jsonify(status="error", error="internal error, retry later"), 503
