"""The relay's configuration, read once from the environment and checked whole.

Web, worker and CLI all build their settings here, so a value means the same
thing in every process. Every problem found is collected and reported in one
message, so an operator fixes a deployment in one pass instead of one variable
per restart.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.retry import DEFAULT_RETRY_SCHEDULE_SECONDS

SOURCES = ("shopify", "typeform")

DEFAULT_MAX_BODY_BYTES = 5 * 1024 * 1024
DEFAULT_DEDUPE_TTL_SECONDS = 72 * 3600
DEFAULT_COPERNICA_BASE_URL = "https://api.copernica.com"
DEFAULT_COPERNICA_AUTH_URL = "https://authenticate.copernica.com"

#: Calls per second and calls in flight toward Copernica, shared by every
#: worker process. Copernica documents no limit but answers overload with
#: 503/504 pages; 0 turns a limit off.
DEFAULT_COPERNICA_MAX_RPS = 20
DEFAULT_COPERNICA_MAX_CONCURRENCY = 8

#: Upper bound of every duration setting (ten years), within what Redis takes.
MAX_SECONDS = 10 * 365 * 24 * 3600

#: The lowest configurable call rate (worker/limits.py's adaptive floor).
MIN_RPS = 0.5

#: How long a database's field list is trusted before it is fetched again: a
#: field deleted in Copernica is noticed within this time (or at once, when
#: Copernica answers 400 to a call naming it).
DEFAULT_SCHEMA_TTL_SECONDS = 300
DEFAULT_QUEUE_NAME = "deliveries"

#: How long a finished delivery's job and result stay readable in Redis.
DEFAULT_RESULT_TTL_SECONDS = 3600

#: How long a failed delivery stays in the failed list for replay (RQ's own
#: default is a year, which lets Redis memory grow without bound).
DEFAULT_FAILED_TTL_SECONDS = 30 * 24 * 3600

#: Connect and read timeouts toward Copernica, in seconds. Both stay well under
#: Heroku's 30 s shutdown grace so a worker can always finish the call in hand.
DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_READ_TIMEOUT_SECONDS = 20.0

#: A delivery job's time limit: under Heroku's 30 s shutdown grace, so a
#: worker told to stop can always finish the delivery in hand.
DEFAULT_JOB_TIMEOUT_SECONDS = 28

#: Of the job's time, a call may take all but this much.
JOB_TIME_RESERVE_SECONDS = 3

#: How long order marks are kept: longer than a failed delivery is kept for
#: replay, so a replayed old event still finds the newer mark.
DEFAULT_ORDER_TTL_SECONDS = 35 * 24 * 3600

#: How often a worker looks for deliveries abandoned by a dead worker.
DEFAULT_RECOVERY_INTERVAL_SECONDS = 10

#: The shortest admin password taken: the page it opens can purge deliveries,
#: and basic auth offers no lock-out of its own.
MIN_ADMIN_PASSWORD_LENGTH = 12


BUNDLED_MAPPINGS = Path(__file__).resolve().parent.parent / "worker" / "mappings.yaml"


class ConfigurationError(Exception):
    """The environment cannot run the relay; the message lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"invalid configuration:\n{lines}")


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = field(default=None, repr=False)
    queue_name: str = DEFAULT_QUEUE_NAME
    secrets: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    dedupe_ttl_seconds: int = DEFAULT_DEDUPE_TTL_SECONDS
    result_ttl_seconds: int = DEFAULT_RESULT_TTL_SECONDS
    failed_ttl_seconds: int = DEFAULT_FAILED_TTL_SECONDS
    mappings_path: Path = BUNDLED_MAPPINGS
    copernica_base_url: str = DEFAULT_COPERNICA_BASE_URL
    copernica_api_version: int = 1
    copernica_access_token: str | None = field(default=None, repr=False)
    copernica_database: str | None = None
    copernica_auth_url: str = DEFAULT_COPERNICA_AUTH_URL
    copernica_max_rps: float = DEFAULT_COPERNICA_MAX_RPS
    copernica_max_concurrency: int = DEFAULT_COPERNICA_MAX_CONCURRENCY
    schema_ttl_seconds: int = DEFAULT_SCHEMA_TTL_SECONDS
    redis_tls_verify: bool = True
    redis_tls_ca_file: Path | None = None
    allow_eviction: bool = False
    log_level: str = "INFO"
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    read_timeout_seconds: float = DEFAULT_READ_TIMEOUT_SECONDS
    retry_schedule_seconds: tuple[int, ...] = DEFAULT_RETRY_SCHEDULE_SECONDS
    job_timeout_seconds: int = DEFAULT_JOB_TIMEOUT_SECONDS
    order_ttl_seconds: int = DEFAULT_ORDER_TTL_SECONDS
    recovery_interval_seconds: int = DEFAULT_RECOVERY_INTERVAL_SECONDS
    admin_password: str | None = field(default=None, repr=False)
    metrics_token: str | None = field(default=None, repr=False)

    @property
    def dry_run(self) -> bool:
        """Without an access token nothing is sent: the worker logs the request."""
        return not self.copernica_access_token

    def secrets_for(self, source: str) -> tuple[bytes, ...]:
        return self.secrets.get(source, ())

    def describe(self) -> dict[str, object]:
        """The settings in effect, fit to log: secrets become a count."""
        return {
            "redis": "embedded or unset"
            if not self.redis_url
            else _mask_url(self.redis_url),
            "queue": self.queue_name,
            "secrets": {s: len(self.secrets_for(s)) for s in SOURCES},
            "max_body_bytes": self.max_body_bytes,
            "dedupe_ttl_seconds": self.dedupe_ttl_seconds,
            "result_ttl_seconds": self.result_ttl_seconds,
            "failed_ttl_seconds": self.failed_ttl_seconds,
            "mappings": str(self.mappings_path),
            "copernica_base_url": self.copernica_base_url,
            "copernica_api_version": self.copernica_api_version,
            "copernica_database": self.copernica_database,
            "copernica_max_rps": self.copernica_max_rps,
            "copernica_max_concurrency": self.copernica_max_concurrency,
            "redis_tls_verify": self.redis_tls_verify,
            "redis_tls_ca_file": (
                str(self.redis_tls_ca_file) if self.redis_tls_ca_file else None
            ),
            "allow_eviction": self.allow_eviction,
            "dry_run": self.dry_run,
            "retry_schedule_seconds": list(self.retry_schedule_seconds),
            "job_timeout_seconds": self.job_timeout_seconds,
            "order_ttl_seconds": self.order_ttl_seconds,
            "recovery_interval_seconds": self.recovery_interval_seconds,
            "admin_page": "enabled" if self.admin_password else "disabled",
            "metrics_token": "set" if self.metrics_token else "unset",
        }


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from environment variables, or raise ConfigurationError."""
    env = os.environ if environ is None else environ
    problems: list[str] = []

    def number(name: str, default, kind=int, minimum=1, maximum=MAX_SECONDS):
        raw = env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            problems.append(f"{name} must be a number, got {raw!r}")
            return default
        if not math.isfinite(value):
            problems.append(f"{name} must be a finite number, got {raw!r}")
            return default
        if value < minimum or value > maximum:
            problems.append(
                f"{name} must be between {minimum} and {maximum:g}, got {raw!r}"
            )
            return default
        return value

    secrets = {
        source: _split_secrets(env.get(f"{source.upper()}_WEBHOOK_SECRET", ""))
        for source in SOURCES
    }

    api_version = number("COPERNICA_API_VERSION", 1)
    if api_version not in SUPPORTED_API_VERSIONS:
        problems.append(
            "COPERNICA_API_VERSION must be one of "
            f"{', '.join(map(str, SUPPORTED_API_VERSIONS))}, got {api_version}"
        )

    base_url = env.get("COPERNICA_BASE_URL", "").strip() or DEFAULT_COPERNICA_BASE_URL
    if not base_url.startswith(("https://", "http://")):
        problems.append(f"COPERNICA_BASE_URL must be an http(s) URL, got {base_url!r}")

    auth_url = env.get("COPERNICA_AUTH_URL", "").strip() or DEFAULT_COPERNICA_AUTH_URL
    if not auth_url.startswith(("https://", "http://")):
        problems.append(f"COPERNICA_AUTH_URL must be an http(s) URL, got {auth_url!r}")

    mappings_path = Path(env.get("RELAY_MAPPINGS", "").strip() or BUNDLED_MAPPINGS)
    if not mappings_path.is_file():
        problems.append(f"RELAY_MAPPINGS: no such file: {mappings_path}")

    schedule = _parse_schedule(env.get("RELAY_RETRY_SCHEDULE", ""), problems)

    redis_url = env.get("REDIS_URL", "").strip() or None
    if redis_url and not redis_url.startswith(REDIS_SCHEMES):
        problems.append(
            f"REDIS_URL must start with {', '.join(REDIS_SCHEMES)}, got "
            f"{_mask_url(redis_url)!r}"
        )

    tls_verify = _flag(env, "REDIS_TLS_VERIFY", True, problems)
    ca_file = env.get("REDIS_TLS_CA_FILE", "").strip()
    if ca_file and not Path(ca_file).is_file():
        problems.append(f"REDIS_TLS_CA_FILE: no such file: {ca_file}")
    if ca_file and not tls_verify:
        # A CA bundle with verification off would be silently ignored.
        problems.append(
            "REDIS_TLS_CA_FILE is set but REDIS_TLS_VERIFY=false: choose one"
        )
    if ca_file and redis_url and not redis_url.startswith("rediss://"):
        problems.append("REDIS_TLS_CA_FILE is set but REDIS_URL is not rediss://")
    allow_eviction = _flag(env, "RELAY_ALLOW_EVICTION", False, problems)

    log_level = env.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if log_level not in LOG_LEVELS:
        problems.append(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
    log_format = env.get("LOG_FORMAT", "").strip().lower()
    if log_format not in ("", "json", "text"):
        problems.append(f"LOG_FORMAT must be json or text, got {log_format!r}")

    connect_timeout = number(
        "COPERNICA_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_SECONDS, float, 0.1
    )
    read_timeout = number(
        "COPERNICA_READ_TIMEOUT", DEFAULT_READ_TIMEOUT_SECONDS, float, 0.1
    )
    job_timeout = number("RELAY_JOB_TIMEOUT", DEFAULT_JOB_TIMEOUT_SECONDS, int, 5)
    longest_call = job_timeout - JOB_TIME_RESERVE_SECONDS
    if connect_timeout + read_timeout > longest_call:
        problems.append(
            "COPERNICA_CONNECT_TIMEOUT + COPERNICA_READ_TIMEOUT must be at most "
            f"{longest_call:g} s (RELAY_JOB_TIMEOUT - {JOB_TIME_RESERVE_SECONDS}), "
            "so a call ends within the delivery job's time"
        )

    # 0 turns the limit off; below the adaptive floor it would be raised by
    # the very overload it should slow down for.
    max_rps = number("COPERNICA_MAX_RPS", DEFAULT_COPERNICA_MAX_RPS, float, 0, 10_000)
    if 0 < max_rps < MIN_RPS:
        problems.append(f"COPERNICA_MAX_RPS must be 0 (off) or at least {MIN_RPS}")

    admin_password = env.get("RELAY_ADMIN_PASSWORD", "").strip() or None
    if admin_password and len(admin_password) < MIN_ADMIN_PASSWORD_LENGTH:
        # The value itself is never repeated: this message reaches logs.
        problems.append(
            f"RELAY_ADMIN_PASSWORD must be at least {MIN_ADMIN_PASSWORD_LENGTH} "
            "characters long"
        )
    if admin_password and not admin_password.isprintable():
        problems.append("RELAY_ADMIN_PASSWORD cannot contain control characters")
    metrics_token = env.get("RELAY_METRICS_TOKEN", "").strip() or None
    if metrics_token and not _token_shape_ok(metrics_token):
        # The value itself stays out of the message: it is a secret.
        problems.append(
            f"RELAY_METRICS_TOKEN must be at least {MIN_METRICS_TOKEN_LENGTH} "
            "printable ASCII characters without spaces"
        )

    database = env.get("COPERNICA_DATABASE", "").strip()
    if database in (".", ".."):
        problems.append("COPERNICA_DATABASE cannot be '.' or '..'")

    settings = Settings(
        redis_url=redis_url,
        redis_tls_verify=tls_verify,
        redis_tls_ca_file=Path(ca_file) if ca_file else None,
        allow_eviction=allow_eviction,
        log_level=log_level,
        queue_name=env.get("RELAY_QUEUE", "").strip() or DEFAULT_QUEUE_NAME,
        secrets=secrets,
        max_body_bytes=number("RELAY_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
        dedupe_ttl_seconds=number("RELAY_DEDUPE_TTL", DEFAULT_DEDUPE_TTL_SECONDS),
        result_ttl_seconds=number("RELAY_RESULT_TTL", DEFAULT_RESULT_TTL_SECONDS),
        failed_ttl_seconds=number("RELAY_FAILED_TTL", DEFAULT_FAILED_TTL_SECONDS),
        mappings_path=mappings_path,
        copernica_base_url=base_url.rstrip("/"),
        copernica_api_version=api_version,
        copernica_access_token=env.get("COPERNICA_ACCESS_TOKEN", "").strip() or None,
        copernica_database=env.get("COPERNICA_DATABASE", "").strip() or None,
        copernica_auth_url=auth_url,
        copernica_max_rps=max_rps,
        copernica_max_concurrency=number(
            "COPERNICA_MAX_CONCURRENCY", DEFAULT_COPERNICA_MAX_CONCURRENCY, int, 0
        ),
        schema_ttl_seconds=number("RELAY_SCHEMA_TTL", DEFAULT_SCHEMA_TTL_SECONDS),
        connect_timeout_seconds=connect_timeout,
        read_timeout_seconds=read_timeout,
        retry_schedule_seconds=schedule,
        job_timeout_seconds=job_timeout,
        order_ttl_seconds=number("RELAY_ORDER_TTL", DEFAULT_ORDER_TTL_SECONDS),
        recovery_interval_seconds=number(
            "RELAY_RECOVERY_INTERVAL", DEFAULT_RECOVERY_INTERVAL_SECONDS
        ),
        admin_password=admin_password,
        metrics_token=metrics_token,
    )
    if problems:
        raise ConfigurationError(problems)
    return settings


SUPPORTED_API_VERSIONS = (1, 4)
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _flag(
    env: Mapping[str, str], name: str, default: bool, problems: list[str]
) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in ("true", "false"):
        problems.append(f"{name} must be true or false, got {raw!r}")
        return default
    return raw == "true"


#: A metrics token shorter than this is too easy to guess.
MIN_METRICS_TOKEN_LENGTH = 16


def _token_shape_ok(token: str) -> bool:
    # It travels in an Authorization header: printable ASCII, no spaces.
    return len(token) >= MIN_METRICS_TOKEN_LENGTH and all(
        "!" <= char <= "~" for char in token
    )


def _split_secrets(raw: str) -> tuple[bytes, ...]:
    # Several comma-separated secrets let an operator rotate without downtime:
    # Shopify may sign with the old secret for up to an hour after a rotation.
    return tuple(part.strip().encode() for part in raw.split(",") if part.strip())


def _parse_schedule(raw: str, problems: list[str]) -> tuple[int, ...]:
    raw = raw.strip()
    if not raw:
        return DEFAULT_RETRY_SCHEDULE_SECONDS
    try:
        delays = tuple(int(part) for part in raw.split(","))
    except ValueError:
        problems.append(
            f"RELAY_RETRY_SCHEDULE must be comma-separated whole seconds, got {raw!r}"
        )
        return DEFAULT_RETRY_SCHEDULE_SECONDS
    if any(delay < 1 for delay in delays):
        problems.append("RELAY_RETRY_SCHEDULE delays must be at least 1 second")
        return DEFAULT_RETRY_SCHEDULE_SECONDS
    return delays


def _mask_url(url: str) -> str:
    # redis://user:password@host:port/0 -> redis://user:***@host:port/0
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"
