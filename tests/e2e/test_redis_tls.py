"""``rediss://`` for web, worker and operator commands, through a real TLS hop.

Redis sits behind tests/tls_proxy.py, which serves a self-signed certificate
as Heroku Redis does. Verification on refuses it with a message that says
what to set; REDIS_TLS_VERIFY=false accepts it; REDIS_TLS_CA_FILE trusts it
and keeps verifying. Connections Redis drops are replaced, not failed on.
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
from tests.tls_proxy import TlsProxy, self_signed_certificate
from tools.embedded_redis import RedisServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def plain_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("tls-redis"), unix_socket=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("tls-cert"))


@pytest.fixture(scope="module")
def proxy(plain_redis, certificate):
    proxy = TlsProxy(plain_redis.port, *certificate).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def client(plain_redis):
    client = redis.Redis.from_url(plain_redis.url)
    yield client
    client.close()


def command(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def deliver(relay: Relay, client: redis.Redis, delivery_id: str) -> None:
    body = b'{"id":5,"email":"tls@example.com"}'
    headers = shopify_headers(body, "customers/create", delivery_id=delivery_id)
    response = relay.post("shopify", body, headers)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job"], timeout=30)
    assert job.get_status() == "finished"


def test_self_signed_certificate_is_refused_while_verifying(proxy, tmp_path):
    env = relay_env(f"rediss://127.0.0.1:{proxy.port}/0", None)
    relay = Relay(env=env, log_dir=tmp_path)
    try:
        relay.start_web()
        relay.start_worker()
        body = b'{"id":6,"email":"refused@example.com"}'
        response = relay.post(
            "shopify", body, shopify_headers(body, "customers/create")
        )
        worker_line = wait_for_log(relay, "Redis not reachable at start")
    finally:
        relay.stop()
    check = command(env, "check", "--offline")

    assert response.status_code == 503
    hint = "REDIS_TLS_VERIFY=false; or set REDIS_TLS_CA_FILE"
    assert hint in worker_line["error"]
    assert "certificate verify failed" in worker_line["error"]
    assert hint in relay.web.output()
    assert check.returncode == 1
    assert "Redis's TLS certificate is not trusted" in check.stderr
    assert hint in check.stderr


@pytest.mark.parametrize(
    "tls",
    [{"REDIS_TLS_VERIFY": "false"}, {"REDIS_TLS_CA_FILE": "cert"}],
    ids=["verify-off", "ca-file"],
)
def test_web_worker_and_commands_work_over_tls(
    proxy, certificate, client, tmp_path, tls
):
    if "REDIS_TLS_CA_FILE" in tls:
        tls = {"REDIS_TLS_CA_FILE": str(certificate[0])}
    env = relay_env(f"rediss://127.0.0.1:{proxy.port}/0", None, **tls)
    relay = Relay(env=env, log_dir=tmp_path)
    try:
        relay.start_web()
        relay.start_worker()
        deliver(relay, client, f"tls-{tmp_path.name}-1")

        # Redis drops every client connection (as on a server `timeout` or a
        # failover); web and worker reconnect instead of failing.
        client.client_kill_filter(_type="normal", skipme=True)
        deliver(relay, client, f"tls-{tmp_path.name}-2")

        check = command(env, "check", "--offline")
        listed = command(env, "failed", "list")
    finally:
        relay.stop()

    assert check.returncode == 0, check.stdout + check.stderr
    assert "redis: ok (maxmemory-policy noeviction)" in check.stdout
    assert listed.returncode == 0, listed.stderr
    # The web side only: RQ prints a traceback when its scheduler process
    # loses Redis, and starts a new one on its next maintenance round.
    assert "Traceback" not in relay.web.output()
