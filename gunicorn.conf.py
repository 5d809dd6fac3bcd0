"""Gunicorn settings for the web process, read from the environment.

Threaded workers with a read deadline per request (app/serving.py): a
webhook's work is a few Redis round trips, so threads keep the acks fast,
and a client that sends its request slowly (a byte at a time, or less than
it promised) holds a thread for at most 10 s instead of for ever. WEB_THREADS
threads per process leave room for everyone else meanwhile.
"""

import os
import sys
from pathlib import Path

_problems: list[str] = []


def _whole_number(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip() or str(default)
    if not raw.isdigit() or int(raw) < 1:
        _problems.append(f"{name} must be a whole number >= 1, got {raw!r}")
        return default
    return int(raw)


bind = f"{os.environ.get('HOST', '0.0.0.0')}:{_whole_number('PORT', 8000)}"
workers = _whole_number("WEB_CONCURRENCY", 2)
worker_class = "app.serving.DeadlineThreadWorker"
# Requests served at once per process. Sixteen keep the acks fast; the rest
# are room for slow clients, each held for at most 10 s.
threads = _whole_number("WEB_THREADS", 32)

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
