"""The web process's gunicorn worker: threads, with a deadline on every request.

gunicorn's threaded worker (gthread) waits up to 5 s for a new connection's
first byte in a pool thread, then reads the request line, the headers and
the body in that thread with blocking reads and no time limit. A client that
sends its request a byte at a time, or less than it declared, holds that
thread for as long as it likes; a handful of them stop a process, and a
container usually has no buffering proxy in front to absorb them.

``DeadlineThreadWorker`` lets no thread wait for a first byte (a silent
connection waits in the main loop's poller instead, closed after the
keep-alive time), and gives each request a deadline: from the first byte
read, the whole request (line, headers and body) must arrive within
``REQUEST_READ_SECONDS``. Every read waits only for what is left of it; once
it has passed, the read fails and the connection is dropped (the webhook
view answers 408 when this happens during the body). A slow client thus
holds a thread for a bounded time, and ``WEB_THREADS`` threads per process
leave room for everyone else meanwhile.

Threads were chosen over gevent: under load gevent's workers served
keep-alive connections unevenly (a p99 of 100-700 ms against 15-30 ms for
threads at 16 connections, bench/ingest.py), while the deadline gives the
same protection against slow clients.
"""

from __future__ import annotations

import errno
import logging
import socket
import time

from gunicorn.workers import gthread
from gunicorn.workers.gthread import ThreadWorker

log = logging.getLogger("relay.web")

#: The whole request must arrive within this long of its first byte. Shopify
#: itself gives up on an answer after 5 s.
REQUEST_READ_SECONDS = 10.0

#: Writing the answer may wait this long for a client that reads slowly.
WRITE_SECONDS = 10.0


class ReadDeadlinePassed(ConnectionResetError):
    """The request did not arrive in time; the connection is dropped.

    A ConnectionResetError, so gunicorn closes the connection quietly instead
    of logging a traceback for a client it had to cut off.
    """

    def __init__(self, seconds: float):
        super().__init__(errno.ECONNRESET, f"request not received within {seconds:g} s")


class DeadlineSocket:
    """A client socket whose reads share one deadline per request."""

    def __init__(self, sock: socket.socket, seconds: float = REQUEST_READ_SECONDS):
        self._sock = sock
        self.seconds = seconds
        self.deadline: float | None = None
        self.expired = False
        # Set by the webhook view when it answered the late request itself.
        self.answered = False

    def begin_request(self) -> None:
        # The clock starts at the request's first read, not while the
        # connection idles between keep-alive requests.
        self.deadline = None
        self.expired = False
        self.answered = False

    def recv(self, size: int) -> bytes:
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.seconds
        remaining = self.deadline - now
        if remaining <= 0:
            self.expired = True
            raise ReadDeadlinePassed(self.seconds)
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv(size)
        except TimeoutError:
            self.expired = True
            raise ReadDeadlinePassed(self.seconds) from None

    def sendall(self, data) -> None:
        self._sock.settimeout(WRITE_SECONDS)
        self._sock.sendall(data)

    def __getattr__(self, name: str):
        # fileno, setblocking, close, shutdown, sendfile, ...: the socket's.
        return getattr(self._sock, name)


class DeadlineThreadWorker(ThreadWorker):
    """gunicorn's gthread worker with a read deadline on every request."""

    def handle(self, conn):
        if not conn.initialized and not conn.data_ready and not conn.wait_for_data(0):
            # gthread would wait up to 5 s for a new connection's first byte
            # in this pool thread; a few hundred silent connections then hold
            # every thread in turn. Hand it straight back to the main loop,
            # which watches it without a thread (for up to the keep-alive
            # time) and queues it again once it has something to read.
            return gthread._DEFER
        if not isinstance(conn.sock, DeadlineSocket):
            conn.sock = DeadlineSocket(conn.sock)
        conn.sock.begin_request()
        try:
            return super().handle(conn)
        finally:
            if conn.sock.expired and not conn.sock.answered:
                # The view logs a body that came too slowly; this covers a
                # request line or headers that never arrived in full.
                log.warning(
                    "request not received in time; connection dropped",
                    extra={
                        "fields": {
                            "client": _address(conn.client),
                            "limit_s": conn.sock.seconds,
                        }
                    },
                )


def _address(client) -> str:
    if isinstance(client, tuple) and client:
        return str(client[0])
    return str(client)
