"""The ingest benchmark's yardstick: a Flask endpoint that does no work.

``POST /webhooks/<source>`` reads the body and answers 202, nothing more. It
runs under the repository's gunicorn.conf.py like the relay, so the ratio of
the two shows what the relay's own work costs on top of the web stack.

    gunicorn --config gunicorn.conf.py "bench.noop:create_app()"
"""

from __future__ import annotations

from flask import Flask, request

ANSWER = b'{"status":"queued"}'


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/webhooks/<source>")
    def receive(source: str):
        request.get_data()
        return ANSWER, 202, {"Content-Type": "application/json"}

    @app.get("/healthz")
    def health():
        return "ok"

    return app
