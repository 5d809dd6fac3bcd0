"""A bad configuration stops every process type with one message naming all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import ROOT, relay_env

pytestmark = pytest.mark.e2e

PROCESSES = {
    "web": [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",
        "gunicorn.conf.py",
        "app:create_app()",
    ],
    "worker": [sys.executable, "-m", "worker"],
    "release check": [sys.executable, "-m", "app", "check", "--offline"],
}


@pytest.mark.parametrize("process", PROCESSES)
def test_every_problem_is_named_at_once(process):
    env = relay_env(
        "redis://127.0.0.1:1/0",
        None,
        RELAY_DEDUPE_TTL="3 days",
        REDIS_TLS_VERIFY="maybe",
        RELAY_ALLOW_EVICTION="sometimes",
        WEB_THREADS="0",
    )

    result = subprocess.run(
        PROCESSES[process],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    message = result.stderr
    assert message.count("invalid configuration:") == 1, message
    assert "RELAY_DEDUPE_TTL must be a number, got '3 days'" in message
    assert "REDIS_TLS_VERIFY must be true or false" in message
    assert "RELAY_ALLOW_EVICTION must be true or false" in message
    if process == "web":
        assert "WEB_THREADS must be a whole number >= 1, got '0'" in message
    assert "Traceback" not in message
