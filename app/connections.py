"""Redis connections, one pool per process, with the timeouts each side needs,
and the start-up check that Redis will not evict queued events."""

from __future__ import annotations

import logging
from pathlib import Path

import redis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: The web process must answer a sender within seconds even when Redis hangs,
#: so it gives up on Redis quickly and answers 503.
WEB_SOCKET_TIMEOUT_SECONDS = 2.0

#: Idle pooled connections are checked before use after this long, so one
#: dropped by the server (or a proxy) is replaced instead of failing a request.
HEALTH_CHECK_INTERVAL_SECONDS = 30

#: Upper bound of connections per process: a web process needs a handful for
#: its requests in flight, a worker four (jobs, scheduler, pub/sub, spare).
MAX_CONNECTIONS = 16

#: A request that finds every connection in use waits this long for one
#: instead of failing at once: a web process runs 32 threads (WEB_THREADS),
#: more than it keeps Redis connections.
POOL_WAIT_SECONDS = 2.0

#: The only policy under which a full Redis refuses new events (the relay then
#: answers 503 and the sender retries) instead of dropping stored ones.
REQUIRED_POLICY = "noeviction"

log = logging.getLogger("relay.redis")


def connect(
    url: str | None,
    socket_timeout: float | None = None,
    tls_verify: bool = True,
    tls_ca_file: Path | None = None,
) -> redis.Redis:
    url = url or DEFAULT_REDIS_URL
    options = {}
    if url.startswith("rediss://") and not tls_verify:
        # Heroku Redis serves TLS with a self-signed certificate that no CA
        # vouches for; REDIS_TLS_VERIFY=false accepts it. The connection is
        # still encrypted. Set explicitly, never by default.
        options["ssl_cert_reqs"] = None
    elif url.startswith("rediss://") and tls_ca_file:
        # A private CA (or the server's own certificate): verified against it
        # instead of the system's CAs, host name included.
        options["ssl_ca_certs"] = str(tls_ca_file)
    pool = redis.BlockingConnectionPool.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=WEB_SOCKET_TIMEOUT_SECONDS,
        health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_SECONDS,
        **options,
    )
    return redis.Redis.from_pool(pool)


def connect_with(settings, socket_timeout: float | None = None) -> redis.Redis:
    """The process's Redis, as the settings say: every process type uses this."""
    return connect(
        settings.redis_url,
        socket_timeout=socket_timeout,
        tls_verify=settings.redis_tls_verify,
        tls_ca_file=settings.redis_tls_ca_file,
    )


class EvictionPolicyRefused(Exception):
    """Redis may evict keys, and the operator has not said that is acceptable."""


def policy_problem(policy: str) -> str | None:
    """Why ``policy`` can lose queued events, or None when it cannot."""
    if policy == REQUIRED_POLICY:
        return None
    return (
        f"Redis maxmemory-policy is {policy!r}: when its memory is full, Redis "
        "would silently drop stored events. Set it to noeviction (Heroku: "
        "heroku redis:maxmemory --policy noeviction; your own server: "
        "maxmemory-policy noeviction in redis.conf), or set "
        "RELAY_ALLOW_EVICTION=true to run anyway"
    )


def check_eviction_policy(connection: redis.Redis, allow_eviction: bool) -> str:
    """Read Redis's maxmemory-policy; raise EvictionPolicyRefused unless safe.

    INFO is read rather than CONFIG GET, which managed services (Heroku Redis,
    ElastiCache) disable. Raises redis.RedisError when Redis does not answer.
    """
    policy = str(connection.info("memory").get("maxmemory_policy", "unknown"))
    problem = policy_problem(policy)
    if problem and not allow_eviction:
        raise EvictionPolicyRefused(problem)
    if problem:
        log.warning(
            "Redis may evict stored events: running anyway (RELAY_ALLOW_EVICTION)",
            extra={"fields": {"maxmemory_policy": policy}},
        )
    return policy


def explain(error: redis.RedisError) -> str:
    """A Redis error in words an operator can act on; never names a password."""
    text = str(error)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"Redis's TLS certificate is not trusted ({text.rstrip('.')}). For a "
            "self-signed certificate such as Heroku Redis's, set "
            "REDIS_TLS_VERIFY=false; or set REDIS_TLS_CA_FILE to the CA that "
            "signed it"
        )
    return f"{type(error).__name__}: {text}"
