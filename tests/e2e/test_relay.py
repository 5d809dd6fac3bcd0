"""Webhook in, Copernica call out: gunicorn, a worker process, Redis, the stand-in."""

from __future__ import annotations

import json
import threading

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from app.intake import dedupe_key
from tests.harness import (
    COPERNICA_TOKEN,
    FIXTURES,
    fixture_bytes,
    shopify_headers,
    typeform_headers,
    wait_for_job,
    wait_for_log,
    wait_for_writes,
    writes,
)
from tests.standin.copernica import Fault

pytestmark = pytest.mark.e2e

ZOE = "zoe.angstrom+shop@example.com"


def profiles_path(version: int) -> str:
    return f"/v{version}/database/1234/profiles"


def expected_query(email: str, version: int) -> list[tuple[str, str]]:
    query = [("fields[]", f"email=={email}"), ("create", "1"), ("async", "0")]
    # v1 carries the token in the URL; v4 never does (Bearer header instead).
    return query + [("access_token", COPERNICA_TOKEN)] if version == 1 else query


def expected_body(fields: dict, version: int) -> dict:
    return fields if version == 1 else {"fields": fields}


def fields_of(record) -> dict:
    """The profile fields a PUT carried, whatever the version's body shape."""
    return record.json["fields"] if record.path.startswith("/v4/") else record.json


def created_status(version: int) -> int:
    # v1 here answers 303 (as observed on v2); v3/v4 answer 201 on create.
    return 303 if version == 1 else 201


FIXTURE_CASES = {
    "shopify/customers_create.json": (
        "customers/create",
        {
            "email": ZOE,
            "firstname": "Zoë",
            "lastname": "Ångström",
            "shopify_customer_id": 8123456789012,
        },
    ),
    "shopify/customers_update.json": (
        "customers/update",
        {
            "email": ZOE,
            "firstname": "Zoë",
            "lastname": "Ångström",
            "phone": "+46701740605",
            "shopify_customer_id": 8123456789012,
            "city": "Göteborg",
            "country": "SE",
        },
    ),
    "shopify/customers_update_legacy_2024-10.json": (
        "customers/update",
        {
            "email": "jose.nunez+vip@example.com",
            "firstname": "José",
            "lastname": "Núñez",
            "phone": "+12025550142",
            "shopify_customer_id": 7012345678901,
            "city": "Malmö",
            "country": "SE",
        },
    ),
    "shopify/customers_email_marketing_consent_update.json": (
        "customers_email_marketing_consent/update",
        {
            "email": ZOE,
            "shopify_customer_id": 8123456789012,
            "email_consent": "subscribed",
            "email_consent_level": "single_opt_in",
            "email_consent_updated": "2026-08-14 10:24:41",
        },
    ),
    "typeform/form_response.json": (
        "form_response",
        {
            "email": "jose.nunez+newsletter@example.com",
            "firstname": "José",
            "lastname": "Núñez Ångström",
            "phone": "+442079460958",
            "email_consent": True,
            "typeform_submitted": "2026-08-14 10:06:47",
        },
    ),
}

PRIVACY_FIXTURES = {
    "shopify/customers_redact.json": "customers/redact",
    "shopify/customers_data_request.json": "customers/data_request",
    "shopify/shop_redact.json": "shop/redact",
}


def connection(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def send_fixture(relay, path: str, topic: str):
    body = fixture_bytes(path)
    if path.startswith("typeform/"):
        return relay.post("typeform", body, typeform_headers(body))
    return relay.post("shopify", body, shopify_headers(body, topic))


@pytest.mark.parametrize("path", sorted(FIXTURE_CASES))
def test_fixture_becomes_the_exact_copernica_request(
    relay, standin, redis_server, api_version, path
):
    topic, fields = FIXTURE_CASES[path]

    response = send_fixture(relay, path, topic)
    assert response.status_code == 202, response.text
    job = wait_for_job(connection(redis_server), response.json()["job"])

    assert job.get_status() == "finished", relay.logs()[-3000:]
    [received] = wait_for_writes(standin, 1)
    assert received.method == "PUT"
    assert received.path == profiles_path(api_version)
    assert received.query == expected_query(fields["email"], api_version)
    assert received.json == expected_body(fields, api_version)
    assert received.headers["content-type"] == "application/json"
    if api_version == 4:
        assert received.headers["authorization"].startswith("Bearer ")


def test_order_fixture_with_its_recorded_headers(
    relay, standin, redis_server, api_version
):
    recorded = json.loads((FIXTURES / "shopify" / "headers.json").read_text())
    body = fixture_bytes("shopify/orders_create.json")

    response = relay.post("shopify", body, recorded["headers"])

    assert response.status_code == 202, response.text
    assert response.json()["delivery"] == recorded["headers"]["X-Shopify-Webhook-Id"]
    job = wait_for_job(connection(redis_server), response.json()["job"])
    assert job.get_status() == "finished", relay.logs()[-3000:]
    received, order = wait_for_writes(standin, 2)
    assert (received.method, received.path) == ("PUT", profiles_path(api_version))
    assert received.query == expected_query(ZOE, api_version)
    # Names from the order's customer, never from the gift shipping address.
    assert received.json == expected_body(
        {
            "email": ZOE,
            "firstname": "Zoë",
            "lastname": "Ångström",
            "shopify_customer_id": 8123456789012,
            "last_order_number": "#1042",
            "last_order_date": "2026-08-14 10:24:41",
            "last_order_total": "886.30",
            "last_order_currency": "SEK",
            "last_order_status": "paid",
        },
        api_version,
    )

    # The order itself, as a subprofile of the profile just created.
    [profile] = standin.profiles(1234)
    assert (order.method, order.path) == (
        "PUT",
        f"/v{api_version}/profile/{profile['id']}/subprofiles/orders",
    )
    assert order.query[:2] == [("fields[]", "order_id==6543210987654"), ("create", "1")]
    assert order.json == {
        "order_id": 6543210987654,
        "order_number": "#1042",
        "order_date": "2026-08-14 10:24:41",
        "total": "886.30",
        "currency": "SEK",
        "status": "paid",
    }
    [subprofile] = standin.subprofiles(profile["id"], "orders")
    assert subprofile["fields"]["order_number"] == "#1042"


@pytest.mark.parametrize(
    "path, event",
    [
        ("shopify/customers_data_request.json", "data request acknowledged"),
        ("shopify/shop_redact.json", "shop redacted"),
    ],
)
def test_privacy_topics_are_verified_and_accepted_without_writes(
    relay, standin, redis_server, path, event
):
    response = send_fixture(relay, path, PRIVACY_FIXTURES[path])

    assert response.status_code == 202
    line = wait_for_log(relay, event)
    assert line["delivery"] == response.json()["delivery"]
    assert writes(standin) == []
    # Done, the request (which names the customer) is not kept as a result.
    assert wait_for_job(connection(redis_server), response.json()["job"]) is None


def test_escaped_and_raw_utf8_bodies_arrive_intact(relay, standin, redis_server):
    escaped = (
        b'{"id":501,"email":"esc\\/aped\\u0026x+1@example.com",'
        b'"first_name":"Line\\u2028Sep","last_name":"\\u00c5berg"}'
    )
    raw = (
        '{"id":502,"email":"raw+2@example.com","first_name":"Åsa",'
        '"last_name":"Öberg 🙂"}'.encode()
    )

    for body in (escaped, raw):
        response = relay.post(
            "shopify", body, shopify_headers(body, "customers/create")
        )
        assert response.status_code == 202, response.text
        wait_for_job(connection(redis_server), response.json()["job"])

    first, second = wait_for_writes(standin, 2)
    assert first.query_values("fields[]") == ["email==esc/aped&x+1@example.com"]
    assert fields_of(first)["firstname"] == "Line\u2028Sep"
    assert fields_of(first)["lastname"] == "Åberg"
    assert second.query_values("fields[]") == ["email==raw+2@example.com"]
    assert fields_of(second)["lastname"] == "Öberg 🙂"


def test_typeform_body_ending_in_newline_is_accepted(relay, standin, redis_server):
    payload = json.loads(fixture_bytes("typeform/form_response.json"))
    payload["form_response"]["token"] = "newline-token"
    body = json.dumps(payload, separators=(",", ":")).encode() + b"\n"

    response = relay.post("typeform", body, typeform_headers(body))

    assert response.status_code == 202, response.text
    wait_for_job(connection(redis_server), response.json()["job"])
    [received] = wait_for_writes(standin, 1)
    assert fields_of(received)["email"] == "jose.nunez+newsletter@example.com"


def test_plus_in_email_reaches_the_selector_exactly(relay, standin, redis_server):
    body = b'{"id":7,"email":"first+last@example.com","first_name":"P"}'

    response = relay.post("shopify", body, shopify_headers(body, "customers/create"))
    wait_for_job(connection(redis_server), response.json()["job"])

    [received] = wait_for_writes(standin, 1)
    assert received.raw_query.startswith(
        "fields%5B%5D=email%3D%3Dfirst%2Blast%40example.com&"
    )
    assert received.query_values("fields[]") == ["email==first+last@example.com"]
    [profile] = standin.profiles(1234)
    assert profile["fields"]["email"] == "first+last@example.com"


def test_customer_without_email_sends_nothing_and_is_skipped(
    relay, standin, redis_server
):
    body = b'{"id":8,"email":null,"first_name":"No","last_name":"Mail"}'

    response = relay.post("shopify", body, shopify_headers(body, "customers/create"))
    job = wait_for_job(connection(redis_server), response.json()["job"])

    assert job.get_status() == "finished"
    result = job.return_value()
    assert result["outcome"] == "skipped"
    assert result["calls"][0]["reason"] == "key field 'email' is missing or empty"
    assert writes(standin) == []
    assert "rule skipped" in relay.logs()


def test_same_delivery_sent_twice_at_once_makes_one_job_and_one_put(
    relay, standin, redis_server
):
    body = b'{"id":9,"email":"twice@example.com","first_name":"Two"}'
    headers = shopify_headers(body, "customers/create", delivery_id="twice-at-once")
    answers = []
    barrier = threading.Barrier(2)

    def post():
        barrier.wait()
        answers.append(relay.post("shopify", body, headers))

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert sorted(answer.status_code for answer in answers) == [200, 202]
    assert answers[0].json()["job"] == answers[1].json()["job"]
    wait_for_job(connection(redis_server), answers[0].json()["job"])
    wait_for_writes(standin, 1)
    assert len(writes(standin)) == 1


def test_copernica_400_fails_at_once_with_its_message(relay, standin, redis_server):
    standin.add_fault(Fault(method="PUT", status=400, message="Invalid field value"))
    body = b'{"id":10,"email":"bad@example.com","first_name":"Bad"}'

    response = relay.post("shopify", body, shopify_headers(body, "customers/create"))
    job = wait_for_job(connection(redis_server), response.json()["job"])

    assert job.get_status() == "failed"
    assert (
        "Copernica answered 400: Invalid field value" in job.latest_result().exc_string
    )
    assert not job.number_of_retries
    assert len(writes(standin)) == 1


def test_copernica_503_twice_then_delivered_after_two_retries(
    relay, standin, redis_server, api_version
):
    standin.add_fault(Fault(method="PUT", status=503, times=2))
    body = b'{"id":11,"email":"flaky@example.com","first_name":"Flaky"}'

    response = relay.post("shopify", body, shopify_headers(body, "customers/create"))
    job = wait_for_job(connection(redis_server), response.json()["job"], timeout=30)

    assert job.get_status() == "finished", relay.logs()[-3000:]
    assert job.number_of_retries == 2
    assert [r.status for r in writes(standin)] == [
        503,
        503,
        created_status(api_version),
    ]
    [profile] = standin.profiles(1234)
    assert profile["fields"]["email"] == "flaky@example.com"


SIGNATURE_CASES = {
    "non-ASCII header": ("shopify", {"X-Shopify-Hmac-Sha256": "é".encode() * 44}),
    "hex digest": ("shopify", "hex"),
    "no header": ("shopify", {}),
    "empty header": ("shopify", {"X-Shopify-Hmac-Sha256": ""}),
    "header for another body": ("shopify", "other-body"),
    "wrong secret": ("shopify", "wrong-secret"),
    "typeform without sha256=": ("typeform", "no-prefix"),
    "typeform empty": ("typeform", {"Typeform-Signature": ""}),
    "typeform non-ASCII": ("typeform", {"Typeform-Signature": "sha256=ü".encode()}),
}


@pytest.mark.parametrize("case", sorted(SIGNATURE_CASES))
def test_bad_signature_is_401_and_nothing_is_queued(relay, standin, redis_server, case):
    source, change = SIGNATURE_CASES[case]
    body = b'{"id":12,"email":"unsigned@example.com","event_type":"form_response"}'
    if source == "shopify":
        headers = shopify_headers(body, "customers/create", delivery_id=f"sig-{case}")
        good = headers.pop("X-Shopify-Hmac-Sha256")
        name = "X-Shopify-Hmac-Sha256"
    else:
        headers = typeform_headers(body)
        good = headers.pop("Typeform-Signature")
        name = "Typeform-Signature"
    if isinstance(change, dict):
        headers.update(change)
    elif change == "hex":
        import base64

        headers[name] = base64.b64decode(good).hex()
    elif change == "other-body":
        headers[name] = shopify_headers(b"{}", "x")["X-Shopify-Hmac-Sha256"]
    elif change == "wrong-secret":
        headers[name] = shopify_headers(body, "x", secret="nope")[
            "X-Shopify-Hmac-Sha256"
        ]
    elif change == "no-prefix":
        headers[name] = good.removeprefix("sha256=")
    queue = Queue(
        "deliveries", connection=connection(redis_server), serializer=JSONSerializer
    )
    queued_before = queue.count

    response = relay.post(source, body, headers)

    assert response.status_code == 401, response.text
    assert response.json()["error"] == "signature missing or wrong"
    assert queue.count == queued_before
    assert not connection(redis_server).exists(dedupe_key("shopify", f"sig-{case}"))
    assert writes(standin) == []


@pytest.mark.parametrize(
    "body, status",
    [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (b'"a string"', 400),
        (b"\xff\xfe", 400),
        (b"", 400),
    ],
)
def test_signed_body_that_is_not_a_json_object_is_400(relay, body, status):
    response = relay.post("shopify", body, shopify_headers(body, "customers/create"))
    assert response.status_code == status
    assert response.json()["error"] == "body is not a JSON object"


def test_body_over_the_limit_is_413_before_anything_else(relay):
    body = b'{"pad":"' + b"x" * (5 * 1024 * 1024) + b'"}'
    # No signature at all: the size is checked before hashing.
    response = relay.post("shopify", body, {"X-Shopify-Topic": "customers/create"})
    assert response.status_code == 413


def test_shopify_without_topic_is_400(relay):
    body = b'{"id":1}'
    headers = shopify_headers(body, "x")
    del headers["X-Shopify-Topic"]
    assert relay.post("shopify", body, headers).status_code == 400


def test_health_and_readiness(relay):
    import requests

    assert requests.get(f"{relay.url}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{relay.url}/readyz", timeout=5).status_code == 200


def test_access_token_never_in_logs_or_job_data(relay, standin, redis_server):
    body = b'{"id":13,"email":"leak-check@example.com","first_name":"Leak"}'
    response = relay.post("shopify", body, shopify_headers(body, "customers/create"))
    job = wait_for_job(connection(redis_server), response.json()["job"])

    stored = b"".join(
        repr(connection(redis_server).hgetall(key)).encode()
        for key in connection(redis_server).scan_iter("rq:*")
        if connection(redis_server).type(key) == b"hash"
    )
    assert COPERNICA_TOKEN.encode() not in stored
    assert COPERNICA_TOKEN not in json.dumps(job.return_value())
    assert COPERNICA_TOKEN not in relay.logs()
    assert "leak-check@example.com" not in relay.logs()


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":' + b"[" * 900 + b"]" * 900 + b"}",
        b'{"email":"nan@example.com","n":NaN}',
        '{"email":"utf16@example.com"}'.encode("utf-16"),
    ],
)
def test_signed_but_unusable_json_is_400_never_503(relay, body):
    response = relay.post("shopify", body, shopify_headers(body, "customers/create"))
    assert response.status_code == 400, response.text


def test_malformed_chunked_body_is_400(relay):
    import socket

    host, port = relay.url.removeprefix("http://").split(":")
    request = (
        b"POST /webhooks/shopify HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_nul_email_sends_nothing(relay, standin, redis_server):
    body = b'{"id":14,"email":"\\u0000","first_name":"Mallory"}'

    response = relay.post("shopify", body, shopify_headers(body, "customers/update"))
    job = wait_for_job(connection(redis_server), response.json()["job"])

    assert job.return_value()["outcome"] == "skipped"
    assert writes(standin) == []
