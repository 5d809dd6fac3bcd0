"""A Redis that may evict stored events stops web, worker and check at start.

Each test runs real servers: Redis configured with another maxmemory-policy,
gunicorn, ``python -m worker`` and ``python -m app check``. A Redis that is
not there yet at start is waited for instead.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from tests.harness import (
    ROOT,
    Relay,
    relay_env,
    shopify_headers,
    wait_for_job,
    wait_for_log,
)
from tools.embedded_redis import RedisServer, free_port

pytestmark = pytest.mark.e2e

WEB = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"]


@pytest.fixture(scope="module")
def evicting_redis(tmp_path_factory):
    server = RedisServer(
        tmp_path_factory.mktemp("lru-redis"),
        unix_socket=False,
        maxmemory_policy="allkeys-lru",
    )
    server.start()
    yield server
    server.stop()


def run(args: list[str], env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def web_args(env: dict) -> tuple[list[str], dict]:
    port = str(free_port())
    return WEB + ["app:create_app()"], {**env, "PORT": port, "HOST": "127.0.0.1"}


def test_web_worker_and_check_refuse_an_evicting_redis(evicting_redis):
    env = relay_env(evicting_redis.url, None)

    args, web_env = web_args(env)
    web = run(args, web_env)
    worker = run([sys.executable, "-m", "worker"], env)
    check = run([sys.executable, "-m", "app", "check", "--offline"], env)

    for name, result in (("web", web), ("worker", worker), ("check", check)):
        assert result.returncode != 0, name
        output = result.stdout + result.stderr
        assert "maxmemory-policy is 'allkeys-lru'" in output, name
        assert "RELAY_ALLOW_EVICTION=true" in output, name
        assert "Traceback" not in output, name
    assert evicting_redis.process.poll() is None


def test_eviction_allowed_explicitly_runs_with_a_warning(evicting_redis, tmp_path):
    env = relay_env(evicting_redis.url, None, RELAY_ALLOW_EVICTION="true")
    relay = Relay(env=env, log_dir=tmp_path)
    try:
        relay.start_web()
        relay.start_worker()
        body = b'{"id":7,"email":"lru@example.com"}'
        response = relay.post(
            "shopify", body, shopify_headers(body, "customers/create")
        )
        assert response.status_code == 202, response.text

        client = redis.Redis.from_url(evicting_redis.url)
        job = wait_for_job(client, response.json()["job"])
        assert job.get_status() == "finished"
        warning = wait_for_log(
            relay,
            "Redis may evict stored events: running anyway (RELAY_ALLOW_EVICTION)",
        )
        assert warning["maxmemory_policy"] == "allkeys-lru"
    finally:
        relay.stop()

    check = run([sys.executable, "-m", "app", "check", "--offline"], env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "allkeys-lru (allowed by RELAY_ALLOW_EVICTION)" in check.stdout


def test_redis_away_at_start_is_waited_for(tmp_path):
    # Nothing listens on this port until the test starts Redis there.
    later = RedisServer(tmp_path / "redis", unix_socket=False)
    env = relay_env(later.url, None)
    relay = Relay(env=env, log_dir=tmp_path)
    try:
        relay.start_web()
        relay.start_worker()
        body = b'{"id":8,"email":"late@example.com"}'
        headers = shopify_headers(body, "customers/create", delivery_id="late")

        early = relay.post("shopify", body, headers)
        check = run([sys.executable, "-m", "app", "check", "--offline"], env)
        wait_for_log(relay, "Redis not reachable at start")
        later.start()
        accepted = relay.post("shopify", body, headers)

        assert early.status_code == 503
        assert check.returncode == 1 and "Redis not reachable" in check.stderr
        assert accepted.status_code == 202, accepted.text
        client = redis.Redis.from_url(later.url)
        job = wait_for_job(client, accepted.json()["job"], timeout=40)
        assert job.get_status() == "finished"
        assert all(w.process.poll() is None for w in relay.workers)
        assert "Traceback" not in relay.logs()
    finally:
        relay.stop()
        later.stop()
