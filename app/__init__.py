"""The web process: receives signed webhooks and queues them for the workers.

``create_app`` reads and checks the configuration and the mapping once, so a
bad deployment stops at start with one readable message instead of failing
requests later. Gunicorn serves ``app:create_app()``; the Flask CLI
(``flask --app app ...``) offers the operator commands.
"""

from __future__ import annotations

import logging
import sys

from flask import Flask, jsonify, request
from rq import Queue
from rq.serializers import JSONSerializer
from werkzeug.exceptions import HTTPException

from app.connections import WEB_SOCKET_TIMEOUT_SECONDS, connect
from app.logs import configure_logging
from app.metrics import RECORDER, known_topics
from app.settings import SOURCES, ConfigurationError, Settings, load_settings
from worker.mapping import MappingError, load_rules

log = logging.getLogger("relay.web")


def create_app(settings: Settings | None = None, announce: bool = True) -> Flask:
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
    connection = connect(
        settings.redis_url,
        socket_timeout=WEB_SOCKET_TIMEOUT_SECONDS,
        tls_verify=settings.redis_tls_verify,
    )
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

    from app import cli, health, metrics_view, webhooks

    app.register_blueprint(webhooks.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics_view.bp)
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
