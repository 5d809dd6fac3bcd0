"""Configuration is read once and every problem is reported together."""

from __future__ import annotations

import pytest

from app.settings import ConfigurationError, load_settings
from worker.retry import DEFAULT_RETRY_SCHEDULE_SECONDS


def test_defaults_run_dry_with_bundled_mapping():
    settings = load_settings({})
    assert settings.dry_run
    assert settings.max_body_bytes == 5 * 1024 * 1024
    assert settings.dedupe_ttl_seconds == 72 * 3600
    assert settings.copernica_base_url == "https://api.copernica.com"
    assert settings.copernica_api_version == 1
    assert settings.retry_schedule_seconds == DEFAULT_RETRY_SCHEDULE_SECONDS
    assert settings.mappings_path.is_file()


def test_secrets_split_on_commas_for_rotation():
    settings = load_settings({"SHOPIFY_WEBHOOK_SECRET": " old , new ,,"})
    assert settings.secrets_for("shopify") == (b"old", b"new")
    assert settings.secrets_for("typeform") == ()


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigurationError) as raised:
        load_settings(
            {
                "RELAY_MAX_BODY_BYTES": "lots",
                "COPERNICA_API_VERSION": "7",
                "RELAY_MAPPINGS": "/nonexistent.yaml",
                "RELAY_RETRY_SCHEDULE": "1,x",
            }
        )
    problems = raised.value.problems
    assert len(problems) == 4
    assert any("RELAY_MAX_BODY_BYTES" in p for p in problems)
    assert any("COPERNICA_API_VERSION" in p for p in problems)


def test_token_never_in_repr_or_description():
    settings = load_settings(
        {
            "COPERNICA_ACCESS_TOKEN": "secret-token-123",
            "SHOPIFY_WEBHOOK_SECRET": "shh-secret",
            "REDIS_URL": "redis://user:pw123@host:6379/0",
        }
    )
    text = repr(settings) + repr(settings.describe())
    assert "secret-token-123" not in text
    assert "shh-secret" not in text
    assert "pw123" not in text
    assert not settings.dry_run


def test_redis_and_logging_settings_are_checked():
    with pytest.raises(ConfigurationError) as raised:
        load_settings(
            {
                "REDIS_URL": "http://user:pw@host/0",
                "REDIS_TLS_VERIFY": "no",
                "LOG_LEVEL": "loud",
                "LOG_FORMAT": "xml",
            }
        )
    text = str(raised.value)
    assert "REDIS_URL must start with" in text and "pw" not in text
    assert "REDIS_TLS_VERIFY must be true or false" in text
    assert "LOG_LEVEL must be one of" in text
    assert "LOG_FORMAT must be json or text" in text
    assert not load_settings({"REDIS_TLS_VERIFY": "false"}).redis_tls_verify


def test_call_timeouts_must_fit_the_shutdown_grace():
    with pytest.raises(ConfigurationError, match="at most 25 s"):
        load_settings(
            {"COPERNICA_CONNECT_TIMEOUT": "10", "COPERNICA_READ_TIMEOUT": "20"}
        )


def test_live_relay_needs_a_database_for_every_rule():
    from worker.mapping import MappingError, load_rules

    live = load_settings({"COPERNICA_ACCESS_TOKEN": "t"})
    with pytest.raises(MappingError, match="COPERNICA_DATABASE is not set"):
        load_rules(live)
    assert load_rules(load_settings({}))  # dry run: the placeholder will do
    assert load_rules(
        load_settings({"COPERNICA_ACCESS_TOKEN": "t", "COPERNICA_DATABASE": "1"})
    )


def test_self_signed_tls_is_accepted_only_when_asked():
    from app.connections import connect

    strict = connect("rediss://127.0.0.1:1/0").connection_pool.connection_kwargs
    relaxed = connect("rediss://127.0.0.1:1/0", tls_verify=False)
    assert strict.get("ssl_cert_reqs", "required") == "required"
    assert relaxed.connection_pool.connection_kwargs["ssl_cert_reqs"] is None


def test_operator_commands_say_so_when_redis_is_not_there(tmp_path):
    import os
    import subprocess
    import sys

    from tests.harness import ROOT
    from tools.embedded_redis import free_port

    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    listed = subprocess.run(
        [sys.executable, "-m", "app", "failed", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 1
    assert "Redis not reachable" in listed.stderr
    assert "Traceback" not in listed.stderr


@pytest.mark.parametrize(
    "name, value",
    [
        ("COPERNICA_MAX_RPS", "nan"),
        ("COPERNICA_MAX_RPS", "inf"),
        ("COPERNICA_MAX_RPS", "0.01"),
        ("RELAY_SCHEMA_TTL", "99999999999999999"),
        ("COPERNICA_DATABASE", ".."),
    ],
)
def test_values_that_would_break_limits_or_redis_are_refused(name, value):
    with pytest.raises(ConfigurationError, match=name):
        load_settings({name: value})
