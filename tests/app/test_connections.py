"""Redis connection options and the eviction policy check, as pure logic."""

from __future__ import annotations

import pytest

from app.connections import MAX_CONNECTIONS, connect_with, policy_problem
from app.settings import ConfigurationError, load_settings


def test_only_noeviction_is_safe():
    assert policy_problem("noeviction") is None
    for policy in ("allkeys-lru", "volatile-ttl", "unknown"):
        problem = policy_problem(policy)
        assert f"maxmemory-policy is {policy!r}" in problem
        assert "RELAY_ALLOW_EVICTION=true" in problem


def test_every_process_pools_at_most_sixteen_connections_with_tls_as_set(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection is made")
    url = "rediss://127.0.0.1:1/0"

    verified = connect_with(
        load_settings({"REDIS_URL": url, "REDIS_TLS_CA_FILE": str(ca)})
    )
    relaxed = connect_with(
        load_settings({"REDIS_URL": url, "REDIS_TLS_VERIFY": "false"})
    )
    plain = connect_with(load_settings({"REDIS_URL": "redis://127.0.0.1:1/0"}))

    kwargs = verified.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(ca)
    assert kwargs.get("ssl_cert_reqs", "required") == "required"
    assert relaxed.connection_pool.connection_kwargs["ssl_cert_reqs"] is None
    assert "ssl_ca_certs" not in plain.connection_pool.connection_kwargs
    for connection in (verified, relaxed, plain):
        assert connection.connection_pool.max_connections == MAX_CONNECTIONS == 16


def test_tls_and_eviction_settings_are_checked(tmp_path):
    with pytest.raises(ConfigurationError) as raised:
        load_settings(
            {
                "REDIS_URL": "redis://127.0.0.1:6379/0",
                "REDIS_TLS_CA_FILE": str(tmp_path / "missing.pem"),
                "REDIS_TLS_VERIFY": "false",
                "RELAY_ALLOW_EVICTION": "yes",
            }
        )
    problems = raised.value.problems
    assert any("REDIS_TLS_CA_FILE: no such file" in p for p in problems)
    assert any("REDIS_TLS_VERIFY=false: choose one" in p for p in problems)
    assert any("REDIS_URL is not rediss://" in p for p in problems)
    assert any("RELAY_ALLOW_EVICTION must be true or false" in p for p in problems)
    assert load_settings({"RELAY_ALLOW_EVICTION": "true"}).allow_eviction
    assert not load_settings({}).allow_eviction
