"""Shared fixtures: a real Redis server per test session, fixture files."""

from __future__ import annotations

import pytest
import redis

from tools.embedded_redis import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (embedded binary, or redis-server on PATH)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()
