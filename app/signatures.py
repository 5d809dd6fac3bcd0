"""Webhook signature checks: raw body bytes and header text in, a verdict out.

Both providers sign the exact request bytes with HMAC-SHA256 and send the
digest base64-encoded; Typeform prefixes it with ``sha256=``. The body is never
parsed or decoded before the check, because any re-serialisation changes the
bytes. Comparison is constant-time over equal-length byte strings, and a header
that is not even well-formed base64 of a SHA-256 digest is rejected before any
HMAC is computed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

DIGEST_BYTES = hashlib.sha256().digest_size
TYPEFORM_PREFIX = "sha256="


def sign(secret: bytes, body: bytes) -> str:
    """The base64 HMAC-SHA256 of ``body``, as both providers send it."""
    return base64.b64encode(hmac.new(secret, body, hashlib.sha256).digest()).decode()


def verify_shopify(secrets: Iterable[bytes], body: bytes, header: str | None) -> bool:
    """Check ``X-Shopify-Hmac-Sha256`` against each configured secret."""
    return _matches_any(secrets, body, _decode_digest(header))


def verify_typeform(secrets: Iterable[bytes], body: bytes, header: str | None) -> bool:
    """Check ``Typeform-Signature: sha256=<base64>`` against each secret."""
    if header is None or not header.startswith(TYPEFORM_PREFIX):
        return False
    return _matches_any(secrets, body, _decode_digest(header[len(TYPEFORM_PREFIX) :]))


def _decode_digest(header: str | None) -> bytes | None:
    # Only strict base64 of exactly 32 bytes can be a signature. A hex digest,
    # an empty value, stray spaces or non-ASCII text all end here as None.
    if not header or not header.isascii():
        return None
    try:
        digest = base64.b64decode(header, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest if len(digest) == DIGEST_BYTES else None


def _matches_any(secrets: Iterable[bytes], body: bytes, digest: bytes | None) -> bool:
    if digest is None:
        return False

    # Every secret is tried, even after a match, so the time taken does not
    # tell which of the rotated secrets signed the request.
    matched = False
    for secret in secrets:
        expected = hmac.new(secret, body, hashlib.sha256).digest()
        matched |= hmac.compare_digest(expected, digest)
    return matched
