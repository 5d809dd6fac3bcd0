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


def pytest_terminal_summary(terminalreporter):
    """How many hostile inputs the fuzz tests tried (see tests/fuzzing.py)."""
    from tests.fuzzing import TRIED

    if TRIED:
        terminalreporter.section("hostile inputs tried")
        for name, count in sorted(TRIED.items()):
            terminalreporter.write_line(f"{count:8}  {name}")
        terminalreporter.write_line(f"{sum(TRIED.values()):8}  in all")
