"""README's walkthrough: the run command, then a fixture sent with `send`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.harness import FIXTURES, ROOT, relay_env
from tools.embedded_redis import free_port

pytestmark = pytest.mark.e2e


def test_run_command_relays_a_sent_fixture_as_a_dry_run(tmp_path):
    port = free_port()
    env = relay_env("", None, PORT=str(port), RELAY_VAR_DIR=str(tmp_path / "var"))
    del env["REDIS_URL"]  # the run command starts its own embedded Redis
    del env["COPERNICA_DATABASE"]
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "tools.launcher"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_up(port, launcher, log_path)
        sent = subprocess.run(
            [
                str(ROOT / "bin" / "relay"),
                "send",
                "shopify",
                "customers/create",
                str(FIXTURES / "shopify/customers_create.json"),
                "--url",
                f"http://127.0.0.1:{port}",
                "--delivery-id",
                "readme-walk",
            ],
            cwd=tmp_path,  # as a user would, from anywhere
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.startswith("202 ")

        line = _wait_for_line(log_path, "dry run: request not sent")
        assert line["delivery"] == "readme-walk"
        assert line["path"] == "/v1/database/COPERNICA_DATABASE-unset/profiles"
        assert line["selector"] == ["email==z***@example.com"]
    finally:
        os.killpg(launcher.pid, signal.SIGINT)
        code = launcher.wait(40)
    assert code == 0, log_path.read_text()[-3000:]


def _wait_until_up(port, launcher, log_path, timeout=40.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(log_path.read_text())
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"relay not up:\n{log_path.read_text()}")


def _wait_for_line(log_path, event, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for text in log_path.read_text(errors="replace").splitlines():
            if text.startswith("{") and f'"event": "{event}"' in text:
                return json.loads(text)
        time.sleep(0.1)
    raise AssertionError(f"no {event!r} in:\n{log_path.read_text()[-3000:]}")
