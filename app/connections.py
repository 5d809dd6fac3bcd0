"""Redis connections, one pool per process, with the timeouts each side needs."""

from __future__ import annotations

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
#: instead of failing at once: the web process serves hundreds of
#: connections per process (gevent), more than it keeps Redis connections.
POOL_WAIT_SECONDS = 2.0


def connect(
    url: str | None, socket_timeout: float | None = None, tls_verify: bool = True
) -> redis.Redis:
    url = url or DEFAULT_REDIS_URL
    options = {}
    if url.startswith("rediss://") and not tls_verify:
        # Heroku Redis serves TLS with a self-signed certificate that no CA
        # vouches for; REDIS_TLS_VERIFY=false accepts it. The connection is
        # still encrypted. Set explicitly, never by default.
        options["ssl_cert_reqs"] = None
    pool = redis.BlockingConnectionPool.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=WEB_SOCKET_TIMEOUT_SECONDS,
        health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_SECONDS,
        **options,
    )
    return redis.Redis(connection_pool=pool)
