"""The request deadline of the web worker, on real loopback sockets."""

from __future__ import annotations

import socket
import time

import pytest

from app.serving import DeadlineSocket, ReadDeadlinePassed


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def test_reads_share_one_deadline_from_the_first_read(pair):
    server, client = pair
    wrapped = DeadlineSocket(server, seconds=0.6)
    wrapped.begin_request()

    client.sendall(b"GET / HTTP/1.1\r\n")
    assert wrapped.recv(1024) == b"GET / HTTP/1.1\r\n"
    time.sleep(0.35)
    client.sendall(b"Host: x\r\n")
    assert wrapped.recv(1024) == b"Host: x\r\n"

    # Each read on its own came in time; together they pass the deadline.
    started = time.monotonic()
    with pytest.raises(ReadDeadlinePassed):
        wrapped.recv(1024)
    assert time.monotonic() - started < 0.5
    assert wrapped.expired


def test_a_new_request_gets_a_new_deadline(pair):
    server, client = pair
    wrapped = DeadlineSocket(server, seconds=0.3)
    wrapped.begin_request()
    client.sendall(b"a")
    assert wrapped.recv(1) == b"a"
    time.sleep(0.4)  # idling between keep-alive requests costs nothing

    wrapped.begin_request()
    client.sendall(b"b")
    assert wrapped.recv(1) == b"b"
    assert not wrapped.expired


def test_the_drop_is_a_quiet_connection_reset(pair):
    server, _ = pair
    wrapped = DeadlineSocket(server, seconds=0.1)
    wrapped.begin_request()
    with pytest.raises(ConnectionResetError):
        wrapped.recv(1)
    # gunicorn closes a reset connection without a traceback in the log.
    with pytest.raises(ConnectionResetError):
        wrapped.recv(1)
