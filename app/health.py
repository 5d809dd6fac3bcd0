"""``/healthz`` says the process answers; ``/readyz`` that Redis does too."""

from __future__ import annotations

import redis
from flask import Blueprint, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    try:
        current_app.extensions["relay"]["redis"].ping()
    except redis.RedisError as error:
        return jsonify(status="unavailable", redis=type(error).__name__), 503
    return jsonify(status="ok", redis="ok")
