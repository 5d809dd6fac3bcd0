"""The Copernica client at its socket edge, against the stand-in and a dead port."""

from __future__ import annotations

import time
from urllib.parse import quote, quote_plus

import pytest

from tests.standin.copernica import CopernicaStandIn, Fault
from tools.embedded_redis import free_port
from worker.copernica import ApiV1, CopernicaClient, StaticToken, TransportError

TOKEN = "tok+/=%&en-secret"
EMAIL = "person+tag@example.com"


def client(base_url: str, read_timeout: float = 2.0) -> CopernicaClient:
    return CopernicaClient(
        base_url=base_url,
        credentials=StaticToken(TOKEN),
        api=ApiV1(),
        connect_timeout=1.0,
        read_timeout=read_timeout,
    )


def call():
    return ApiV1().profile_put("1", (("email", EMAIL),), {"email": EMAIL}, True, False)


@pytest.fixture
def standin():
    with CopernicaStandIn(
        access_token=TOKEN, databases={1: ["email"]}, put_status=303
    ) as server:
        yield server


def test_created_profile_id_is_kept_and_303_not_followed(standin):
    answer = client(standin.base_url).send(call())

    assert answer.ok and answer.status == 303
    assert answer.created_id == "1001"
    assert [r.method for r in standin.requests] == ["PUT"]


def test_unreachable_copernica_error_names_neither_token_nor_email():
    with pytest.raises(TransportError) as raised:
        client(f"http://127.0.0.1:{free_port()}").send(call())

    text = str(raised.value)
    assert "ConnectionError" in text
    for secret in (TOKEN, "person", "example.com", "access_token"):
        assert secret not in text


def test_read_timeout_is_reported_as_such(standin):
    standin.add_fault(Fault(status=None, delay=1.5))
    with pytest.raises(TransportError, match="no answer within 0.5 s"):
        client(standin.base_url, read_timeout=0.5).send(call())


@pytest.mark.parametrize(
    "echo",
    [
        TOKEN,
        quote(TOKEN, safe=""),
        quote(TOKEN),  # "/" left as it is
        quote_plus(TOKEN),
    ],
)
def test_token_echoed_in_an_error_message_is_redacted(standin, echo):
    standin.add_fault(Fault(status=400, message=f"bad token {echo} here"))

    answer = client(standin.base_url).send(call())

    assert not answer.ok and not answer.retryable
    assert answer.message == "bad token *** here"


def test_long_error_messages_are_cut(standin):
    standin.add_fault(Fault(status=400, message="x" * 100_000))
    assert len(client(standin.base_url).send(call()).message) == 300


def test_an_answer_trickling_past_the_deadline_is_a_transport_error():
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def trickle():
        connection, _ = server.accept()
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(40):  # a byte every 0.1 s: never 0.5 s of silence
            if stop.is_set():
                break
            connection.sendall(b"x")
            time.sleep(0.1)
        connection.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    slow = CopernicaClient(
        base_url=f"http://127.0.0.1:{server.getsockname()[1]}",
        credentials=StaticToken(TOKEN),
        api=ApiV1(),
        connect_timeout=0.5,
        read_timeout=0.5,
    )
    started = time.monotonic()
    try:
        with pytest.raises(TransportError, match="answer not complete within 1 s") as e:
            slow.send(call())
    finally:
        stop.set()
        server.close()
    assert e.value.sent
    assert time.monotonic() - started < 2.5


def test_a_refused_connection_was_certainly_not_sent():
    with pytest.raises(TransportError) as raised:
        client(f"http://127.0.0.1:{free_port()}").send(call())
    assert not raised.value.sent


def test_cached_jwts_and_field_lists_are_kept_apart_per_token_and_account():
    from worker.copernica import JwtSource
    from worker.schema import SchemaCache

    first = JwtSource(None, "https://auth.example", "token-a")
    rotated = JwtSource(None, "https://auth.example", "token-b")
    assert first.cache_key != rotated.cache_key
    assert "token-a" not in first.cache_key

    one = SchemaCache(None, None, ApiV1(), 60, account="https://a\ntoken-a")
    other = SchemaCache(None, None, ApiV1(), 60, account="https://b\ntoken-a")
    assert one._key("1234") != other._key("1234")


@pytest.mark.parametrize("answer", ["abc X: 1", "pr€tty", "<html>no</html>", "{}"])
def test_a_token_answer_that_is_no_jwt_is_not_cached(standin, redis_client, answer):
    from worker.copernica import JwtSource

    standin.add_fault(Fault(status=200, body=answer, path_contains="/authenticate"))
    source = JwtSource(redis_client, f"{standin.base_url}/authenticate", TOKEN)

    with pytest.raises(TransportError, match="not a JWT"):
        source.current()
    assert not redis_client.exists(source.cache_key)

    jwt = source.current()  # the endpoint answers properly again
    assert jwt.count(".") == 2
    assert redis_client.ttl(source.cache_key) > 60
    redis_client.delete(source.cache_key)
