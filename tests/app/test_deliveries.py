"""Delivery records from headers and bodies."""

from __future__ import annotations

import json

import pytest
from werkzeug.datastructures import Headers

from app.deliveries import (
    Delivery,
    DeliveryError,
    parse_body,
    shopify_delivery,
    typeform_delivery,
)
from tests.harness import FIXTURES

NOW = "2026-12-04T10:00:00+00:00"


def test_shopify_delivery_from_recorded_headers_any_case():
    meta = json.loads((FIXTURES / "shopify" / "headers.json").read_text())
    headers = Headers({name.lower(): value for name, value in meta["headers"].items()})

    delivery = shopify_delivery(headers, {"id": 1}, b"{}", NOW)

    assert delivery.topic == "orders/create"
    assert delivery.delivery_id == "3f9c1e7a-52d4-4b8e-9a61-0c2d7b4e8f15"
    assert delivery.account == "nordlys-goods-test.myshopify.com"
    assert delivery.event_at == "2026-08-14T08:24:42.118309517Z"
    assert delivery.event_id == "a7d2e0b4-1c3f-4e59-8b6a-92f0c4d1e3a8"


def test_typeform_delivery_id_is_form_token_and_event_type():
    body = json.loads((FIXTURES / "typeform" / "form_response.json").read_bytes())

    delivery = typeform_delivery(Headers(), body, b"{}", NOW)

    assert delivery.delivery_id == (
        "Xq3sK9Lm:0f4ri7sq8zykmk9j0f4ri7uw2wq1bdky:form_response"
    )
    assert delivery.event_id == "01K2Q8M4Z7T3VYB6XW0R5N9CHD"
    assert delivery.account == "Xq3sK9Lm"
    assert delivery.event_at == "2026-08-14T08:06:47Z"


def test_missing_topic_is_an_error():
    with pytest.raises(DeliveryError):
        shopify_delivery(Headers(), {}, b"{}", NOW)
    with pytest.raises(DeliveryError):
        typeform_delivery(Headers(), {"form_response": {}}, b"{}", NOW)


def test_missing_or_hostile_delivery_ids_become_hashes():
    headers = Headers({"X-Shopify-Topic": "customers/create"})
    a = shopify_delivery(headers, {}, b'{"a":1}', NOW)
    b = shopify_delivery(headers, {}, b'{"a":1}', NOW)
    assert a.delivery_id == b.delivery_id
    assert a.delivery_id.startswith("sha256-")

    headers["X-Shopify-Webhook-Id"] = "x" * 5000
    assert len(shopify_delivery(headers, {}, b"{}", NOW).delivery_id) < 100


def test_record_round_trips_through_a_dict():
    delivery = Delivery("shopify", "t", "d", None, NOW, None, None, {"a": [1]})
    assert Delivery.from_dict(json.loads(json.dumps(delivery.to_dict()))) == delivery


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        '{"a": 1}'.encode("utf-16"),
        b"\xef\xbb\xbf{}",
        b'{"a": "\xff"}',
        b'{"a":' + b"[" * 65 + b"]" * 65 + b"}",
        b"[]",
        b"1",
        b"",
        b"null",
    ],
)
def test_bodies_that_are_not_plain_json_objects_are_refused(raw):
    assert parse_body(raw) is None


def test_ordinary_bodies_parse_including_escapes_and_depth_to_the_limit():
    assert parse_body(b'{"a":"\\u2028\\/"}') == {"a": "\u2028/"}
    assert parse_body(b'{"a":' + b"[" * 63 + b"]" * 63 + b"}") is not None


def test_long_or_odd_topics_are_refused():
    with pytest.raises(DeliveryError):
        shopify_delivery(Headers({"X-Shopify-Topic": "t" * 201}), {}, b"{}", NOW)
    with pytest.raises(DeliveryError):
        typeform_delivery(Headers(), {"event_type": "a\nb"}, b"{}", NOW)


def test_long_typeform_tokens_that_share_a_prefix_do_not_collide():
    def delivery(token):
        body = {
            "event_type": "form_response",
            "form_response": {"form_id": "F", "token": token},
        }
        return typeform_delivery(Headers(), body, b"{}", NOW).delivery_id

    assert delivery("x" * 300 + "1") != delivery("x" * 300 + "2")


def test_lone_surrogate_in_a_token_still_gives_an_id():
    body = {
        "event_type": "form_response",
        "form_response": {"form_id": "F", "token": "\ud800"},
    }
    assert typeform_delivery(Headers(), body, b"{}", NOW).delivery_id.startswith(
        "sha256-"
    )


def test_deeply_nested_body_round_trips_shallowly():
    body = {"a": [[[[1]]]]}
    delivery = Delivery("shopify", "t", "d", None, NOW, None, None, body)
    assert delivery.to_dict()["body"] is body
