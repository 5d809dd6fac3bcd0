"""Hostile input through the Flask app: random, mutated and oversized requests.

Properties, each over many generated inputs: the relay never answers 500 (or
anything 5xx but a 503 it chose), never raises, and queues nothing unless the
request carries a valid signature. The app talks to a real Redis; the queue
is counted before and after every request. Transport-level cases (chunked
bodies, raw header bytes, slow senders) are in tests/e2e/test_hostile_http.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import resource
import uuid

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from rq import Queue

from app import create_app
from app.metrics import RECORDER
from app.settings import load_settings
from app.signatures import DIGEST_BYTES, TYPEFORM_PREFIX, _decode_digest, sign
from tests.fuzzing import tried
from tests.harness import (
    SHOPIFY_SECRET,
    TYPEFORM_SECRET,
    fixture_bytes,
    shopify_headers,
    typeform_headers,
)

LIMIT = 64 * 1024
QUEUE = "hostile-input"
SIGNATURE_HEADERS = {
    "shopify": "X-Shopify-Hmac-Sha256",
    "typeform": "Typeform-Signature",
}
SECRETS = {"shopify": SHOPIFY_SECRET, "typeform": TYPEFORM_SECRET}
SOURCES = st.sampled_from(["shopify", "typeform"])


@pytest.fixture(scope="module")
def app(redis_server):
    # A database of its own: the thousands of requests here leave queued
    # jobs and metrics that other tests on this Redis must not count.
    url = redis_server.url
    url = f"{url}?db=1" if url.startswith("unix://") else url.rsplit("/", 1)[0] + "/1"
    settings = load_settings(
        {
            "REDIS_URL": url,
            "SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET,
            "TYPEFORM_WEBHOOK_SECRET": TYPEFORM_SECRET,
            "RELAY_MAX_BODY_BYTES": str(LIMIT),
            "RELAY_QUEUE": QUEUE,
        }
    )
    app = create_app(settings, announce=False)
    yield app
    # The process-wide metrics recorder counted these requests; its counts
    # and its flushing thread end here, before the session's Redis does.
    RECORDER._reset()
    app.extensions["relay"]["redis"].flushdb()


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def queue(app) -> Queue:
    return app.extensions["relay"]["queue"]


@pytest.fixture(scope="module")
def unexpected(app):
    """Records every 'request failed unexpectedly' the app logs."""
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.exc_info or "unexpectedly" in record.getMessage():
                seen.append(record.getMessage())

    handler = Catch()
    logging.getLogger("relay").addHandler(handler)
    yield seen
    logging.getLogger("relay").removeHandler(handler)


def signed_headers(source: str, body: bytes) -> dict[str, str]:
    if source == "shopify":
        return shopify_headers(body, "customers/update")
    return typeform_headers(body)


def post(client, source, body, headers, method="POST"):
    return client.open(f"/webhooks/{source}", method=method, data=body, headers=headers)


def assert_refused_and_nothing_queued(response, queue, before, unexpected):
    assert response.status_code in (400, 401, 404, 405, 413), response.data
    assert queue.count == before
    assert unexpected == []


# ------------------------------------------------------------------ timing


@pytest.mark.parametrize("source", ["shopify", "typeform"])
@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(
            lambda good: ("A" if good[0] != "A" else "B") + good[1:], id="same"
        ),
        pytest.param(lambda good: good[:-4], id="shorter"),
        pytest.param(lambda good: good + "AAAA", id="longer"),
        pytest.param(
            lambda good: base64.b64encode(b"\0" * 64).decode(), id="64-byte-digest"
        ),
    ],
)
def test_wrong_signature_of_any_length_gets_401_without_an_exception(
    client, queue, unexpected, source, forge
):
    body = fixture_bytes("shopify/customers_create.json")
    headers = signed_headers(source, body)
    name = SIGNATURE_HEADERS[source]
    good = headers[name].removeprefix(TYPEFORM_PREFIX)
    headers[name] = (TYPEFORM_PREFIX if source == "typeform" else "") + forge(good)
    before = queue.count

    response = post(client, source, body, headers)

    assert response.status_code == 401
    assert_refused_and_nothing_queued(response, queue, before, unexpected)


@given(header=st.text(max_size=200))
def test_any_header_text_decodes_to_a_full_digest_or_nothing(header):
    # compare_digest is only ever handed two 32-byte strings: a header that
    # is not exactly that much base64 never reaches it.
    tried("signature header text")
    digest = _decode_digest(header)
    assert digest is None or (isinstance(digest, bytes) and len(digest) == DIGEST_BYTES)


# ---------------------------------------------------------- random requests


@given(
    source=SOURCES,
    body=st.binary(max_size=4096),
    signature=st.one_of(
        st.none(),
        st.text(
            st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
            max_size=120,
        ),
    ),
)
def test_random_bodies_and_signatures_are_refused(
    client, queue, unexpected, source, body, signature
):
    tried("random body and signature")
    headers = {"Content-Type": "application/json", "X-Shopify-Topic": "orders/create"}
    if signature is not None:
        headers[SIGNATURE_HEADERS[source]] = signature.encode("utf-8").decode("latin-1")
    before = queue.count

    response = post(client, source, body, headers)

    assert_refused_and_nothing_queued(response, queue, before, unexpected)


MUTATIONS = st.sampled_from(["flip", "insert", "delete", "truncate", "append"])


@given(
    source=SOURCES,
    mutation=MUTATIONS,
    position=st.integers(min_value=0),
    byte=st.integers(min_value=0, max_value=255),
)
def test_a_signed_body_changed_in_any_byte_is_refused(
    client, queue, unexpected, source, mutation, position, byte
):
    tried("mutated signed body")
    original = fixture_bytes(
        "shopify/customers_create.json"
        if source == "shopify"
        else "typeform/form_response.json"
    )
    headers = signed_headers(source, original)
    at = position % len(original)
    flipped = bytes([original[at] ^ (byte or 1)])
    body = {
        "flip": original[:at] + flipped + original[at + 1 :],
        "insert": original[:at] + bytes([byte]) + original[at:],
        "delete": original[:at] + original[at + 1 :],
        "truncate": original[:at],
        "append": original + bytes([byte]),
    }[mutation]
    assume(body != original)
    before = queue.count

    response = post(client, source, body, headers)

    assert response.status_code == 401
    assert_refused_and_nothing_queued(response, queue, before, unexpected)


HEADER_NAMES = st.sampled_from(
    [
        "X-Shopify-Topic",
        "X-Shopify-Webhook-Id",
        "X-Shopify-Shop-Domain",
        "X-Shopify-Triggered-At",
        "X-Shopify-Hmac-Sha256",
        "Typeform-Signature",
        "Content-Type",
        "Content-Encoding",
        "Transfer-Encoding",
        "X-Anything",
    ]
)
# Latin-1 is all that a header can carry through the test client; raw bytes
# beyond it go through real gunicorn in the e2e tests.
HEADER_VALUES = st.one_of(
    st.text(st.characters(max_codepoint=255, exclude_characters="\r\n"), max_size=80),
    st.just(""),
    st.just("x" * 20_000),
)


@given(
    source=SOURCES,
    signed=st.booleans(),
    extra=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6),
)
def test_odd_headers_never_break_the_relay(
    client, queue, unexpected, source, signed, extra
):
    tried("odd, huge, empty and duplicated headers")
    body = json.dumps({"email": "fuzz@example.com", "id": 1}).encode()
    headers = list(signed_headers(source, body).items()) if signed else []
    if not signed:
        headers.append((SIGNATURE_HEADERS[source], sign(b"not-the-secret", body)))
    # Added after the real ones: a duplicated header adds a second value.
    headers += extra
    before = queue.count

    response = post(client, source, body, headers)

    assert unexpected == []
    assert response.status_code < 500 or response.status_code == 503
    if response.status_code in (200, 202):
        assert signed
        first = dict(reversed(headers))  # the first value of each name
        name = SIGNATURE_HEADERS[source]
        expected = signed_headers(source, body)[name]
        assert first.get(name) == expected or not first.get(name)
    else:
        assert queue.count == before


@given(
    source=SOURCES,
    method=st.sampled_from(["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]),
    path=st.sampled_from(["shopify", "typeform", "other", "Shopify", "shopify/"]),
)
def test_other_methods_and_paths_queue_nothing(
    client, queue, unexpected, source, method, path
):
    tried("methods and paths")
    body = fixture_bytes("shopify/customers_create.json")
    before = queue.count

    response = client.open(
        f"/webhooks/{path}",
        method=method,
        data=body,
        headers=signed_headers(source, body),
    )

    assert response.status_code in (200, 308, 404, 405)
    if response.status_code == 200:
        assert method in ("OPTIONS", "HEAD") and response.data == b""
    assert queue.count == before
    assert unexpected == []


@given(
    source=SOURCES,
    content_type=st.one_of(
        st.sampled_from(
            [
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "text/plain; charset=latin-1",
                "application/json; charset=utf-16",
                "",
            ]
        ),
        st.text(st.characters(max_codepoint=126, min_codepoint=32), max_size=60),
    ),
)
def test_any_content_type_with_a_valid_signature_is_judged_by_the_bytes(
    client, queue, unexpected, source, content_type
):
    # The signature covers the bytes; the declared type changes nothing.
    tried("content types")
    body = json.dumps({"email": "type@example.com", "event_type": "x"}).encode()
    headers = dict(signed_headers(source, body), **{"Content-Type": content_type})

    response = post(client, source, body, headers)

    assert response.status_code in (200, 202)
    assert unexpected == []


@pytest.mark.parametrize("source", ["shopify", "typeform"])
def test_compressed_bodies_are_not_inflated(client, queue, unexpected, source):
    # Neither provider compresses; a gzip body signed as sent is not JSON,
    # and one signed before compression does not verify.
    plain = json.dumps({"email": "gzip@example.com"}).encode()
    packed = gzip.compress(plain)
    before = queue.count

    as_sent = post(
        client,
        source,
        packed,
        dict(signed_headers(source, packed), **{"Content-Encoding": "gzip"}),
    )
    before_packing = post(
        client,
        source,
        packed,
        dict(signed_headers(source, plain), **{"Content-Encoding": "gzip"}),
    )

    assert (as_sent.status_code, before_packing.status_code) == (400, 401)
    assert_refused_and_nothing_queued(before_packing, queue, before, unexpected)


# --------------------------------------------------------------- big bodies


def padded(size: int, source: str = "shopify") -> bytes:
    """The source's fixture as a JSON object of exactly ``size`` bytes."""
    fixture = (
        "shopify/customers_create.json"
        if source == "shopify"
        else "typeform/form_response.json"
    )
    payload = json.loads(fixture_bytes(fixture))
    if source == "typeform":
        # The token makes the delivery id; each body is a new delivery.
        payload["form_response"]["token"] = uuid.uuid4().hex
    skeleton = json.dumps(dict(payload, pad="")).encode()
    body = skeleton[:-2] + b"x" * (size - len(skeleton)) + b'"}'
    assert len(body) == size
    return body


@pytest.mark.parametrize("source", ["shopify", "typeform"])
@pytest.mark.parametrize(
    "size, status", [(LIMIT - 1, 202), (LIMIT, 202), (LIMIT + 1, 413)]
)
def test_bodies_at_the_size_limit(client, queue, unexpected, source, size, status):
    body = padded(size, source)
    before = queue.count

    response = post(client, source, body, signed_headers(source, body))

    assert response.status_code == status
    assert queue.count == before + (status == 202)
    assert unexpected == []


@given(source=SOURCES, depth=st.integers(min_value=1, max_value=30_000))
def test_deeply_nested_json_is_refused_or_taken_never_crashes(
    client, queue, unexpected, source, depth
):
    tried("deeply nested JSON")
    body = b'{"a":' * depth + b"1" + b"}" * depth
    assume(len(body) <= LIMIT)

    response = post(client, source, body, signed_headers(source, body))

    assert response.status_code in (200, 202, 400)
    assert unexpected == []


@given(
    source=SOURCES,
    keys=st.integers(min_value=1, max_value=6000),
    kind=st.sampled_from(["object", "array", "numbers"]),
)
def test_very_large_json_within_the_limit_never_crashes(
    client, queue, unexpected, source, keys, kind
):
    tried("very large JSON")
    if kind == "object":
        payload = {f"k{n}": n for n in range(keys)}
    elif kind == "array":
        payload = {"items": [[n, str(n)] for n in range(keys)]}
    else:
        payload = {"n": int("9" * min(keys, 4000))}
    body = json.dumps(payload).encode()
    assume(len(body) <= LIMIT)

    response = post(client, source, body, signed_headers(source, body))

    assert response.status_code in (200, 202, 400)
    assert unexpected == []


def test_memory_stays_bounded_under_a_volley_of_large_bodies(client, unexpected):
    # Peak RSS in KiB on Linux: a few hundred bodies at and over the limit
    # must not keep them all.
    bodies = [padded(LIMIT), padded(LIMIT) + b" " * LIMIT]
    warm = [post(client, "shopify", b, {"X-Shopify-Hmac-Sha256": "x"}) for b in bodies]
    assert [r.status_code for r in warm] == [401, 413]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    for _ in range(300):
        for body in bodies:
            post(client, "shopify", body, {"X-Shopify-Hmac-Sha256": "x"})
    tried("large bodies for memory", 600)

    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 20 * 1024
    assert unexpected == []
