"""Gunicorn settings for the web process, read from the environment.

gevent workers: a webhook's work is a few Redis round trips, and a client
that sends its request slowly (a byte at a time, or less than it promised)
holds only a cheap greenlet while it does. With threads (gthread, 8 per
process) twenty such clients held every thread and everyone else waited;
gunicorn 27 reads headers and body in the thread with no time limit, and a
container often has no buffering proxy in front to absorb such clients. The
body read has a deadline of its own (app/webhooks.py answers 408).
"""

import os
import sys
from pathlib import Path

# Before anything else opens a socket or a lock: the app is loaded here in
# the master (preload_app), and its Redis pool must use gevent's sockets and
# queues in the workers.
from gevent import monkey

monkey.patch_all()

_problems: list[str] = []


def _whole_number(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip() or str(default)
    if not raw.isdigit() or int(raw) < 1:
        _problems.append(f"{name} must be a whole number >= 1, got {raw!r}")
        return default
    return int(raw)


bind = f"{os.environ.get('HOST', '0.0.0.0')}:{_whole_number('PORT', 8000)}"
workers = _whole_number("WEB_CONCURRENCY", 2)
worker_class = "gevent"
# Connections served at once per process; each needs a file descriptor.
worker_connections = _whole_number("WEB_CONNECTIONS", 1000)

if _problems:
    # One message with every problem, the relay's own settings included, as
    # create_app would give if gunicorn's values had been right.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from app.settings import ConfigurationError, load_settings

    try:
        load_settings()
    except ConfigurationError as error:
        _problems += error.problems
    _lines = "\n".join(f"  - {problem}" for problem in _problems)
    sys.exit(f"relay not started: invalid configuration:\n{_lines}")

# Under Heroku's 30 s router limit and shutdown grace.
timeout = 25
graceful_timeout = 20
keepalive = 5

# Load the app once in the master: a bad configuration or mapping stops the
# whole server at start with its message, instead of workers failing to boot.
preload_app = True

accesslog = None
errorlog = "-"

# Gunicorn's control socket lives in the home directory, shared by every
# gunicorn of the user; the relay does not use it.
control_socket_disable = True
