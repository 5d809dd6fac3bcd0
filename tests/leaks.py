"""No secrets anywhere: what the test suite's processes wrote, searched for leaks.

Every relay process started by the tests logs into a folder under pytest's
session temporary directory, and every Redis server the tests start keeps
its data there too. Before a Redis server stops, ``dump_jobs`` writes each
RQ job it holds (description, meta, result, error, and its data unpacked)
beside it. At the end of the session ``find_leaks`` reads all of it, and the
run fails if any of these appear in clear:

- the webhook secrets and the Copernica access token: nowhere at all;
- the fixture emails: nowhere but in a job's own data, which is the webhook
  body the worker must deliver, and Redis's append-only file, which holds
  that data as RQ stores it.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import redis

#: Where a job's data goes: the delivery, with the customer's own body.
JOB_DATA_SUFFIX = ".job-data.txt"
JOBS_SUFFIX = ".jobs.txt"

#: Files that hold a delivery's body by design: emails allowed, secrets not.
BODY_HOLDERS = (JOB_DATA_SUFFIX, ".aof")

EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[a-z]{2,}")


@dataclass(frozen=True)
class Leak:
    path: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what} in clear"


def secrets_and_emails(fixtures: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """What must not leak, by a name that is safe to print."""
    from tests.harness import COPERNICA_TOKEN, SHOPIFY_SECRET, TYPEFORM_SECRET

    secrets = {
        "the Shopify webhook secret": SHOPIFY_SECRET.encode(),
        "the Typeform webhook secret": TYPEFORM_SECRET.encode(),
        "the Copernica access token": COPERNICA_TOKEN.encode(),
    }
    emails = {}
    for path in sorted(fixtures.rglob("*.json")):
        for found in EMAIL.findall(path.read_bytes()):
            emails[f"fixture email {found[:2].decode()}***"] = found
    return secrets, emails


def dump_jobs(url: str, folder: Path, name: str = "redis") -> None:
    """Write every RQ job in this Redis to text files in ``folder``."""
    connection = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = sorted(connection.scan_iter("rq:job:*", count=1000))
        results = sorted(connection.scan_iter("rq:results:*", count=1000))
        with (
            open(folder / f"{name}{JOBS_SUFFIX}", "a") as jobs,
            open(folder / f"{name}{JOB_DATA_SUFFIX}", "a") as data,
        ):
            for key in keys:
                fields = connection.hgetall(key) if _is_hash(connection, key) else {}
                shown = {}
                for field_name, value in fields.items():
                    text = _unpacked(field_name, value)
                    if field_name == b"data":
                        data.write(f"{key.decode()} {text}\n")
                    else:
                        shown[field_name.decode()] = text
                jobs.write(json.dumps({"key": key.decode(), **shown}) + "\n")
            for key in results:
                for _entry_id, entry in connection.xrange(key):
                    values = {k.decode(): _text(v) for k, v in entry.items()}
                    jobs.write(json.dumps({"key": key.decode(), **values}) + "\n")
    except redis.RedisError as error:
        (folder / f"{name}{JOBS_SUFFIX}").write_text(f"not dumped: {error}\n")
    finally:
        connection.close()


def _is_hash(connection, key) -> bool:
    return connection.type(key) == b"hash"


def _unpacked(field_name: bytes, value: bytes) -> str:
    # RQ compresses a job's data and its error text.
    if field_name in (b"data", b"exc_info"):
        try:
            value = zlib.decompress(value)
        except zlib.error:
            pass
    return _text(value)


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def find_leaks(folder: Path, fixtures: Path) -> list[Leak]:
    """Every secret anywhere, and every fixture email outside a body's home."""
    secrets, emails = secrets_and_emails(fixtures)
    leaks = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.endswith(BODY_HOLDERS) or "appendonly" in path.name:
            leaks += _scan(path, secrets)
        elif path.name.endswith((".log", JOBS_SUFFIX)):
            leaks += _scan(path, {**secrets, **emails})
        # Anything else there is a test's own input (a mapping, a body).
    return leaks


def _scan(path: Path, wanted: dict[str, bytes]) -> list[Leak]:
    try:
        content = path.read_bytes()
    except OSError:
        return []
    found = []
    for what, needle in wanted.items():
        start = content.find(needle)
        while start != -1:
            found.append(Leak(path, content.count(b"\n", 0, start) + 1, what))
            start = content.find(needle, start + 1)
    return found
