"""``bin/run``: the whole relay on one machine, for trying it and for development.

Starts an embedded Redis when REDIS_URL is unset (its data under ``var/redis``
survives restarts), then the web process under gunicorn and one delivery
worker, exactly as the Procfile runs them. Without COPERNICA_ACCESS_TOKEN the
worker runs dry: it logs each request it would send and sends nothing.
Ctrl-C stops everything; if one process dies, the others are stopped too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from app.settings import ConfigurationError, load_settings
from tools.embedded_redis import RedisServer
from worker.mapping import MappingError, load_rules

ROOT = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("RELAY_VAR_DIR", ROOT / "var"))
STOP_GRACE_SECONDS = 30


def main() -> int:
    try:
        settings = load_settings()
        load_rules(settings)
    except (ConfigurationError, MappingError) as error:
        print(f"relay not started: {error}", file=sys.stderr)
        return 2

    env = dict(os.environ)
    env.setdefault("PORT", "8000")
    # Locally the relay listens on loopback only; HOST=0.0.0.0 opens it up.
    env.setdefault("HOST", "127.0.0.1")
    redis_server = None
    if not settings.redis_url:
        redis_server = RedisServer(VAR_DIR / "redis")
        if _answers(redis_server.url):
            print(
                f"relay not started: an embedded Redis already runs in "
                f"{redis_server.directory}; is another bin/run still running?",
                file=sys.stderr,
            )
            return 2
        env["REDIS_URL"] = redis_server.start()

    commands = {
        "web": [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            "gunicorn.conf.py",
            "app:create_app()",
        ],
        "worker": [sys.executable, "-m", "worker"],
    }
    processes = {
        name: subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
        for name, command in commands.items()
    }

    stopping = []
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    exit_code = 0
    announced = False
    while not stopping:
        ended = {n: p.returncode for n, p in processes.items() if p.poll() is not None}
        if ended:
            name, code = next(iter(ended.items()))
            print(f"relay: {name} exited with {code}; stopping", file=sys.stderr)
            exit_code = code or 1
            break
        if not announced and _listening(env["HOST"], int(env["PORT"])):
            _banner(env, settings.dry_run, redis_server is not None)
            announced = True
        time.sleep(0.2)

    _stop(processes)
    if redis_server:
        redis_server.stop()
    return exit_code


def _answers(redis_url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(processes: dict[str, subprocess.Popen]) -> None:
    # SIGTERM lets gunicorn finish requests in flight and the worker finish
    # the delivery in hand, as Heroku does on a restart.
    for process in processes.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes.values():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _banner(env: dict[str, str], dry_run: bool, embedded: bool) -> None:
    lines = [
        f"relay: listening on http://{env['HOST']}:{env['PORT']}",
        "relay: Redis "
        + (f"embedded, data in {VAR_DIR / 'redis'}" if embedded else "from REDIS_URL"),
        "relay: "
        + (
            "DRY RUN, nothing is sent to Copernica (set COPERNICA_ACCESS_TOKEN)"
            if dry_run
            else "delivering to Copernica"
        ),
        "relay: try it: bin/relay send shopify customers/create "
        "../shared/fixtures/shopify/customers_create.json",
        "relay: stop with Ctrl-C",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
