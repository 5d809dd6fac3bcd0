"""Signature checks on raw bytes, against the fixtures' own recorded headers."""

from __future__ import annotations

import base64
import json

import pytest

from app.signatures import sign, verify_shopify, verify_typeform
from tests.harness import FIXTURES, SHOPIFY_SECRET, TYPEFORM_SECRET

SHOPIFY_BODIES = sorted(
    path.name
    for path in (FIXTURES / "shopify").glob("*.json")
    if path.name != "headers.json"
)


def recorded(source: str) -> tuple[dict, bytes]:
    meta = json.loads((FIXTURES / source / "headers.json").read_text())
    return meta, (FIXTURES / source / meta["body_file"]).read_bytes()


def test_shopify_fixture_verifies_with_its_recorded_header():
    meta, body = recorded("shopify")
    secret = meta["signing_secret_for_tests"].encode()
    assert verify_shopify([secret], body, meta["headers"]["X-Shopify-Hmac-Sha256"])


def test_typeform_fixture_verifies_with_its_recorded_header():
    meta, body = recorded("typeform")
    secret = meta["signing_secret_for_tests"].encode()
    assert verify_typeform([secret], body, meta["headers"]["Typeform-Signature"])


@pytest.mark.parametrize("name", SHOPIFY_BODIES)
def test_every_shopify_fixture_verifies_when_signed_with_the_fake_secret(name):
    body = (FIXTURES / "shopify" / name).read_bytes()
    assert verify_shopify(
        [SHOPIFY_SECRET.encode()], body, sign(SHOPIFY_SECRET.encode(), body)
    )


def test_rotated_secrets_any_one_verifies():
    body = b'{"a":1}'
    secrets = [b"old-secret", b"new-secret"]
    assert verify_shopify(secrets, body, sign(b"old-secret", body))
    assert verify_shopify(secrets, body, sign(b"new-secret", body))
    assert not verify_shopify(secrets, body, sign(b"other", body))


def test_reserialised_body_does_not_verify():
    meta, body = recorded("shopify")
    compact = json.dumps(json.loads(body), separators=(",", ":")).encode()
    assert not verify_shopify(
        [meta["signing_secret_for_tests"].encode()],
        compact,
        meta["headers"]["X-Shopify-Hmac-Sha256"],
    )


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        " ",
        "sha256=",
        "not base64!",
        "é" * 44,
        base64.b64encode(b"x" * 31).decode(),  # right alphabet, wrong length
    ],
)
def test_malformed_shopify_headers_are_refused(header):
    assert not verify_shopify([b"s"], b"{}", header)


def test_hex_digest_is_refused():
    digest = base64.b64decode(sign(b"s", b"{}")).hex()
    assert not verify_shopify([b"s"], b"{}", digest)


def test_wrong_signature_of_right_length_is_refused_without_error():
    good = sign(b"s", b"{}")
    wrong = ("A" if good[0] != "A" else "B") + good[1:]
    assert len(wrong) == len(good)
    assert not verify_shopify([b"s"], b"{}", wrong)


def test_typeform_needs_the_prefix():
    signature = sign(b"s", b"{}")
    assert verify_typeform([b"s"], b"{}", "sha256=" + signature)
    assert not verify_typeform([b"s"], b"{}", signature)
    assert not verify_typeform([b"s"], b"{}", "SHA256=" + signature)
    assert not verify_typeform([b"s"], b"{}", "sha1=" + signature)


def test_typeform_newline_at_end_is_part_of_the_signed_bytes():
    body = TYPEFORM_SECRET.encode()  # any bytes
    signed = b'{"event_type":"form_response"}\n'
    header = "sha256=" + sign(body, signed)
    assert verify_typeform([body], signed, header)
    assert not verify_typeform([body], signed.rstrip(b"\n"), header)


def test_no_secrets_never_verifies():
    assert not verify_shopify([], b"{}", sign(b"", b"{}"))
