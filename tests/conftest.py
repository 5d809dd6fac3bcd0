"""Shared fixtures: a real Redis server per test session, fixture files.

At the end of the session, everything the relay's processes logged and every
job left in the tests' Redis servers is searched for secrets and fixture
emails in clear (tests/leaks.py); any found fails the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.leaks import dump_jobs, find_leaks
from tools.embedded_redis import RedisServer

#: pytest's temporary folder for this session: every relay log is under it.
SESSION_FOLDER: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def session_folder(tmp_path_factory):
    SESSION_FOLDER.append(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (embedded binary, or redis-server on PATH)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
        dump_jobs(server.url, server.directory)


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a secret or a fixture email was written in clear."""
    if not SESSION_FOLDER:
        return
    from tests.harness import FIXTURES

    leaks = find_leaks(SESSION_FOLDER[0], FIXTURES)
    session.config.stash[LEAKS] = leaks
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


LEAKS = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter):
    leaks = terminalreporter.config.stash.get(LEAKS, [])
    if leaks:
        terminalreporter.section("secrets or personal data in clear", red=True)
        for leak in leaks[:50]:
            terminalreporter.write_line(str(leak))
        terminalreporter.write_line(f"{len(leaks)} in all: the run fails")

    # How many hostile inputs the fuzz tests tried (see tests/fuzzing.py).
    from tests.fuzzing import TRIED

    if TRIED:
        terminalreporter.section("hostile inputs tried")
        for name, count in sorted(TRIED.items()):
            terminalreporter.write_line(f"{count:8}  {name}")
        terminalreporter.write_line(f"{sum(TRIED.values()):8}  in all")
