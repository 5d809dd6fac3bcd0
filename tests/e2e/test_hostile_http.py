"""Hostile requests at the transport level, against real gunicorn over raw sockets.

What the Flask test client cannot send: chunked and broken chunked bodies,
header bytes that are not ASCII, headers over gunicorn's limits, a declared
length that never arrives, and clients that trickle their request a byte at
a time. The relay must answer every one of them without a 500 and keep
answering everyone else in time, with its memory bounded.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from app.webhooks import BODY_READ_SECONDS
from tests.harness import Relay, relay_env, shopify_headers

pytestmark = pytest.mark.e2e

LIMIT = 256 * 1024
QUEUE = "hostile-http"


@pytest.fixture(scope="module")
def relay(redis_server, tmp_path_factory):
    relay = Relay(
        env=relay_env(
            redis_server.url,
            None,
            RELAY_QUEUE=QUEUE,
            RELAY_MAX_BODY_BYTES=str(LIMIT),
        ),
        log_dir=tmp_path_factory.mktemp("hostile-http"),
    )
    relay.start_web()
    yield relay
    relay.stop()


@pytest.fixture
def queued(redis_server):
    connection = redis.Redis.from_url(redis_server.url)

    def count() -> int:
        return connection.llen(f"rq:queue:{QUEUE}")

    yield count
    connection.close()


def body_for(email: str = "raw@example.com") -> bytes:
    return json.dumps({"email": email, "id": 7, "first_name": "Raw"}).encode()


def head(path: str, headers: dict[str, str] | list, extra: bytes = b"") -> bytes:
    items = headers.items() if isinstance(headers, dict) else headers
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in items]
    return "\r\n".join(lines).encode() + b"\r\n" + extra + b"\r\n"


def exchange(relay, raw: bytes, timeout: float = 10.0) -> int:
    """Send raw bytes, return the answer's status code (0: closed unanswered)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_status(sock)


def read_status(sock: socket.socket) -> int:
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    if not answer.startswith(b"HTTP/1."):
        return 0
    return int(answer.split(b" ", 2)[1])


def chunked(body: bytes, size: int = 1000) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    return encoded + b"0\r\n\r\n"


def signed(body: bytes, **extra: str) -> dict[str, str]:
    headers = shopify_headers(body, "customers/update", str(uuid.uuid4()), **extra)
    headers.pop("Content-Type")
    return {"Content-Type": "application/json", **headers}


def test_chunked_signed_body_is_taken(relay, queued):
    body = body_for()
    headers = dict(signed(body), **{"Transfer-Encoding": "chunked"})
    before = queued()

    assert exchange(relay, head("/webhooks/shopify", headers) + chunked(body)) == 202
    assert queued() == before + 1


def test_chunked_body_over_the_limit_is_refused(relay, queued):
    body = json.dumps({"pad": "x" * LIMIT}).encode()
    headers = dict(signed(body), **{"Transfer-Encoding": "chunked"})
    before = queued()

    raw = head("/webhooks/shopify", headers) + chunked(body, 64 * 1024)
    assert exchange(relay, raw) == 413
    assert queued() == before


@pytest.mark.parametrize(
    "broken",
    [b"zz\r\nabc\r\n0\r\n\r\n", b"5\r\nab\r\n0\r\n\r\n", b"ffffffffffffffffff\r\n"],
    ids=["not-hex", "short-chunk", "absurd-size"],
)
def test_broken_chunked_encoding_is_refused(relay, queued, broken):
    headers = dict(signed(b"{}"), **{"Transfer-Encoding": "chunked"})
    before = queued()

    raw = head("/webhooks/shopify", headers) + broken
    status = exchange(relay, raw, timeout=BODY_READ_SECONDS + 5)

    # A chunk size that promises more than ever comes runs into the deadline.
    assert status in (0, 400, 401, 408)
    assert queued() == before


def test_declared_length_over_the_limit_is_refused_before_the_body(relay, queued):
    headers = dict(signed(b"{}"), **{"Content-Length": str(LIMIT + 1)})
    before = queued()
    started = time.monotonic()

    assert exchange(relay, head("/webhooks/shopify", headers)) == 413
    assert time.monotonic() - started < 2
    assert queued() == before


def test_gzip_body_is_not_inflated(relay, queued):
    packed = gzip.compress(body_for())
    headers = dict(
        signed(packed),
        **{"Content-Encoding": "gzip", "Content-Length": str(len(packed))},
    )
    before = queued()

    assert exchange(relay, head("/webhooks/shopify", headers) + packed) == 400
    assert queued() == before


@pytest.mark.parametrize(
    "raw_header",
    [
        b"X-Shopify-Hmac-Sha256: " + "é☃".encode() * 20,
        b"X-Shopify-Hmac-Sha256: \xff\xfe\x00",
        b"X-Shopify-Topic: customers/\xc3\xa9",
        b"X-Anything: " + b"x" * 9000,
        b"".join(b"X-Many-%d: v\r\n" % n for n in range(150)).rstrip(b"\r\n"),
        b"X-Shopify-Hmac-Sha256:",
        b": no-name",
    ],
    ids=[
        "utf8-signature",
        "binary",
        "utf8-topic",
        "huge",
        "too-many",
        "empty",
        "nameless",
    ],
)
def test_odd_header_bytes_are_refused_without_a_500(relay, queued, raw_header):
    body = body_for()
    headers = {"Content-Length": str(len(body)), "X-Shopify-Topic": "customers/update"}
    raw = head("/webhooks/shopify", headers, raw_header + b"\r\n") + body
    before = queued()

    status = exchange(relay, raw)

    assert status in (400, 401, 431)
    assert queued() == before


def test_duplicated_signature_headers_take_the_first(relay, queued):
    body = body_for(f"dup-{uuid.uuid4().hex[:6]}@example.com")
    good = signed(body)
    forged = [("X-Shopify-Hmac-Sha256", "A" * 43 + "=")]
    before = queued()

    first_forged = forged + list(good.items()) + [("Content-Length", len(body))]
    assert exchange(relay, head("/webhooks/shopify", first_forged) + body) == 401
    assert queued() == before


# --------------------------------------------------------------- slow clients


def test_a_body_short_of_its_length_or_trickling_gets_408_in_time(relay, queued):
    body = body_for()
    headers = dict(signed(body), **{"Content-Length": str(len(body))})
    raw = head("/webhooks/shopify", headers)
    answers = {}

    def short():
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as s:
            s.sendall(raw + body[:10])
            answers["short"] = read_status(s)

    def trickle():
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as s:
            s.sendall(raw)
            try:
                for byte in body:
                    s.sendall(bytes([byte]))
                    time.sleep(0.25)
            except OSError:
                pass  # the relay stopped reading: answered already
            answers["trickle"] = read_status(s)

    before = queued()
    started = time.monotonic()
    clients = [threading.Thread(target=short), threading.Thread(target=trickle)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=30)

    assert answers == {"short": 408, "trickle": 408}
    assert time.monotonic() - started < BODY_READ_SECONDS + 3
    assert queued() == before


class Trickler(threading.Thread):
    """A client that sends its request a byte at a time, or stops short."""

    def __init__(self, relay, mode: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.relay, self.mode, self.stop = relay, mode, stop
        self.closed_by_server = 0

    def run(self):
        body = body_for()
        headers = signed(body, **{"Content-Length": str(len(body))})
        raw = head("/webhooks/shopify", headers)
        while not self.stop.is_set():
            try:
                self._one(raw, body)
            except OSError:
                self.closed_by_server += 1
                self.stop.wait(0.2)

    def _one(self, raw: bytes, body: bytes):
        with socket.create_connection(("127.0.0.1", self.relay.port), timeout=60) as s:
            if self.mode == "headers":
                payload = raw + body
            elif self.mode == "body":
                s.sendall(raw)
                payload = body
            else:  # promises the whole body, sends half, then waits
                s.sendall(raw + body[: len(body) // 2])
                self.stop.wait(120)
                return
            for byte in payload:
                if self.stop.wait(0.2):
                    return
                s.sendall(bytes([byte]))
            read_status(s)


def test_slow_clients_do_not_stop_the_relay_answering_others(relay):
    stop = threading.Event()
    tricklers = [
        Trickler(relay, mode, stop) for mode in ("headers", "body", "short") * 7
    ][:21]
    for trickler in tricklers:
        trickler.start()
    time.sleep(1.5)  # every slow client connected and holding its request

    durations = []
    try:
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            body = body_for(f"prompt-{uuid.uuid4().hex[:8]}@example.com")
            headers = dict(signed(body), **{"Content-Length": str(len(body))})
            started = time.monotonic()
            status = exchange(relay, head("/webhooks/shopify", headers) + body, 5)
            durations.append((status, round(time.monotonic() - started, 3)))
            time.sleep(0.2)
    finally:
        stop.set()
        for trickler in tricklers:
            trickler.join(timeout=10)

    took = sorted(seconds for _, seconds in durations)
    print(
        f"{len(durations)} signed webhooks beside {len(tricklers)} slow clients: "
        f"median {took[len(took) // 2]:.3f} s, slowest {took[-1]:.3f} s"
    )
    assert all(status == 202 for status, _ in durations), durations
    assert max(took for _, took in durations) < 1.0, durations


def test_silent_connections_hold_no_thread(relay):
    # Hundreds of connections that send nothing: gthread would give each a
    # pool thread for up to 5 s, and a webhook behind them waited 25 s.
    silent = []
    try:
        for _ in range(300):
            silent.append(socket.create_connection(("127.0.0.1", relay.port), 5))
        time.sleep(0.5)

        took = []
        for _ in range(5):
            body = body_for(f"beside-silent-{uuid.uuid4().hex[:8]}@example.com")
            headers = dict(signed(body), **{"Content-Length": str(len(body))})
            started = time.monotonic()
            status = exchange(relay, head("/webhooks/shopify", headers) + body, 10)
            took.append(round(time.monotonic() - started, 3))
            assert status == 202
    finally:
        for connection in silent:
            connection.close()

    print(f"webhooks beside {len(silent)} silent connections took {took} s")
    assert max(took) < 1.0, took


def test_memory_of_the_web_process_stays_bounded(relay):
    def rss_kib() -> int:
        pids = [relay.web.process.pid]
        children = Path(f"/proc/{relay.web.process.pid}/task")
        for task in children.iterdir():
            kids = (task / "children").read_text().split()
            pids += [int(kid) for kid in kids]
        total = 0
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total

    big = json.dumps({"pad": "x" * (LIMIT - 20)}).encode()
    over = big + b" " * 1024

    def volley(count: int):
        for _ in range(count):
            for body in (big, over):
                headers = dict(signed(body), **{"Content-Length": str(len(body))})
                headers["X-Shopify-Hmac-Sha256"] = "A" * 43 + "="
                exchange(relay, head("/webhooks/shopify", headers) + body)

    volley(20)  # warm up: allocator pools, thread stacks
    before = rss_kib()
    volley(150)
    grown = rss_kib() - before

    assert grown < 30 * 1024, f"web processes grew by {grown} KiB"
