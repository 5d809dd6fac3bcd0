"""Real processes for end-to-end tests: gunicorn, RQ workers, signed requests.

Nothing of the relay is mocked. The web process runs under gunicorn with the
repository's gunicorn.conf.py, workers run as ``python -m worker``, and both
talk to a real Redis server. Only Copernica is a stand-in, on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from app.signatures import TYPEFORM_PREFIX, sign
from tools.embedded_redis import free_port

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("RELAY_FIXTURES", ROOT.parent / "shared" / "fixtures"))
FIXTURES_MISSING = (
    f"webhook fixtures not found at {FIXTURES}: the tests read the signed "
    "samples from ../shared/fixtures beside the clone; set RELAY_FIXTURES to "
    "their folder"
)

if not (FIXTURES / "shopify" / "headers.json").is_file():
    raise ImportError(FIXTURES_MISSING)

SHOPIFY_SECRET = json.loads((FIXTURES / "shopify" / "headers.json").read_text())[
    "signing_secret_for_tests"
]
TYPEFORM_SECRET = json.loads((FIXTURES / "typeform" / "headers.json").read_text())[
    "signing_secret_for_tests"
]
COPERNICA_TOKEN = "standin-token-" + "x" * 24

#: The Copernica fields the bundled mapping writes, for the stand-in.
DATABASE_FIELDS = [
    "email",
    "firstname",
    "lastname",
    "phone",
    "shopify_customer_id",
    "city",
    "country",
    "last_order_number",
    "last_order_date",
    "last_order_total",
    "last_order_currency",
    "last_order_status",
    "email_consent",
    "email_consent_level",
    "email_consent_updated",
    "typeform_submitted",
]

#: The fields of the bundled mapping's "orders" collection.
ORDER_FIELDS = ["order_id", "order_number", "order_date", "total", "currency", "status"]


def fixture_bytes(relative: str) -> bytes:
    return (FIXTURES / relative).read_bytes()


def shopify_headers(
    body: bytes,
    topic: str,
    delivery_id: str | None = None,
    secret: str = SHOPIFY_SECRET,
    **extra: str,
) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": sign(secret.encode(), body),
        "X-Shopify-Shop-Domain": "nordlys-goods-test.myshopify.com",
        "X-Shopify-Webhook-Id": delivery_id or str(uuid.uuid4()),
        "X-Shopify-Triggered-At": "2026-08-14T08:24:42.118309517Z",
        **extra,
    }


def typeform_headers(body: bytes, secret: str = TYPEFORM_SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Typeform-Signature": TYPEFORM_PREFIX + sign(secret.encode(), body),
    }


def relay_env(redis_url: str, copernica_url: str | None, **overrides: str) -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COPERNICA_", "RELAY_", "SHOPIFY_", "TYPEFORM_"))
    }
    env.update(
        {
            "REDIS_URL": redis_url,
            "SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET,
            "TYPEFORM_WEBHOOK_SECRET": TYPEFORM_SECRET,
            "COPERNICA_DATABASE": "1234",
            "RELAY_RETRY_SCHEDULE": "1,1,1",
            "LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if copernica_url:
        env["COPERNICA_BASE_URL"] = copernica_url
        env["COPERNICA_ACCESS_TOKEN"] = COPERNICA_TOKEN
    env.update(overrides)
    return env


@dataclass
class Process:
    """A child process whose output goes to a log file the test can read."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Relay:
    """gunicorn plus workers, all sharing one Redis and one environment."""

    env: dict[str, str]
    log_dir: Path
    port: int = field(default_factory=free_port)
    web: Process | None = None
    workers: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_web(self, timeout: float = 20.0) -> None:
        env = {
            **self.env,
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "WEB_CONCURRENCY": self.env.get("WEB_CONCURRENCY", "2"),
        }
        self.web = Process(
            "web",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--config",
                "gunicorn.conf.py",
                "app:create_app()",
            ],
            env,
            self.log_dir / "web.log",
        )
        self.web.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.web.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.web.output()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError(f"gunicorn not ready:\n{self.web.output()}")

    def start_worker(self) -> Process:
        index = len(self.workers)
        worker = Process(
            f"worker-{index}",
            [sys.executable, "-m", "worker"],
            self.env,
            self.log_dir / f"worker-{index}.log",
        )
        worker.start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for process in [self.web, *self.workers]:
            if process:
                process.stop()

    def post(
        self, source: str, body: bytes, headers: dict[str, str], timeout: float = 10.0
    ) -> requests.Response:
        return requests.post(
            f"{self.url}/webhooks/{source}", data=body, headers=headers, timeout=timeout
        )

    def logs(self) -> str:
        parts = [self.web.output()] if self.web else []
        return "\n".join(parts + [worker.output() for worker in self.workers])


def started_relay(
    redis_url: str,
    copernica_url: str,
    folder: Path,
    mapping: str | None = None,
    **env: str,
) -> Relay:
    """A running relay (web and one worker), with its own mapping if given."""
    if mapping is not None:
        (folder / "mappings.yaml").write_text(mapping)
        env["RELAY_MAPPINGS"] = str(folder / "mappings.yaml")
    relay = Relay(env=relay_env(redis_url, copernica_url, **env), log_dir=folder)
    relay.start_web()
    relay.start_worker()
    return relay


def wait_for_log(relay, event: str, timeout: float = 20.0) -> dict:
    """The first JSON log line of ``event`` from the relay's processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in relay.logs().splitlines():
            if line.startswith("{") and f'"event": "{event}"' in line:
                return json.loads(line)
        time.sleep(0.1)
    raise AssertionError(f"no {event!r} in the relay's logs")


def wait_for_job(
    connection: redis.Redis,
    job_id: str,
    timeout: float = 20.0,
    states=("finished", "failed"),
) -> Job:
    """Poll until the job reaches one of ``states``; return it."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        try:
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return None  # finished and not kept (result TTL 0)
        status = job.get_status(refresh=True)
        if status in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {status} after {timeout} s")


def writes(standin) -> list:
    """The calls that change Copernica (PUT, POST, DELETE), in arrival order.

    Reads of the field list and profile look-ups are left out, and so is the
    v4 token exchange: they come and go with the relay's caches, and do not
    change what Copernica holds.
    """
    return [
        r
        for r in standin.requests
        if r.method in ("PUT", "POST", "DELETE") and r.path != "/authenticate"
    ]


def wait_for_writes(standin, count: int, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = writes(standin)
        if len(found) >= count and all(r.status is not None for r in found[:count]):
            return found
        time.sleep(0.05)
    raise AssertionError(f"{len(writes(standin))} writes arrived, not {count}")
