"""The delivery record: one verified webhook as the relay stores and queues it.

Built from a request's headers and parsed body by pure functions, one per
source. The record is plain data and travels as the RQ job's JSON argument, so
it is readable in Redis and survives upgrades of either side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

#: Delivery ids come from senders; longer ones are replaced by their hash so a
#: hostile header cannot bloat Redis keys or logs.
MAX_DELIVERY_ID_LENGTH = 200

#: Real payloads nest a handful of levels; far deeper ones only serve to
#: exhaust the recursion of every JSON encoder down the line.
MAX_BODY_DEPTH = 64

#: Topics are short names like ``customers/update``; a longer one is refused.
MAX_TOPIC_LENGTH = 200


class DeliveryError(ValueError):
    """A verified request that still lacks what a delivery needs."""


@dataclass(frozen=True)
class Delivery:
    source: str
    topic: str
    delivery_id: str
    account: str | None
    received_at: str  # ISO-8601 UTC, when the relay accepted it
    event_at: str | None  # ISO-8601, when the event happened per the sender
    event_id: str | None
    body: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: asdict() copies the body recursively, and a
        # deeply nested body would hit Python's recursion limit.
        return {item.name: getattr(self, item.name) for item in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Delivery:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})

    @property
    def label(self) -> str:
        """How logs and job descriptions name it, without any personal data."""
        return f"{self.source} {self.topic} {self.delivery_id}"


def parse_body(raw: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None if it is anything else.

    Strict on purpose: UTF-8 only (both providers send it), no NaN or
    Infinity (not JSON, and Copernica could not read them back), and no
    nesting deeper than MAX_BODY_DEPTH.
    """
    try:
        payload = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict) or _depth_exceeds(payload, MAX_BODY_DEPTH):
        return None
    return payload


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _depth_exceeds(value: Any, limit: int) -> bool:
    # Iterative, so the check itself cannot hit the recursion limit.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend(
            (child, depth + 1) for child in children if isinstance(child, dict | list)
        )
    return False


def shopify_delivery(
    headers: Mapping[str, str], body: Mapping[str, Any], raw: bytes, received_at: str
) -> Delivery:
    topic = _topic((headers.get("X-Shopify-Topic") or "").strip(), "X-Shopify-Topic")

    return Delivery(
        source="shopify",
        topic=topic,
        delivery_id=_bounded(headers.get("X-Shopify-Webhook-Id"), raw),
        account=_header(headers, "X-Shopify-Shop-Domain"),
        received_at=received_at,
        event_at=_header(headers, "X-Shopify-Triggered-At"),
        event_id=_header(headers, "X-Shopify-Event-Id"),
        body=body,
    )


def typeform_delivery(
    headers: Mapping[str, str], body: Mapping[str, Any], raw: bytes, received_at: str
) -> Delivery:
    topic = body.get("event_type")
    topic = _topic(topic if isinstance(topic, str) else "", "event_type")

    response = body.get("form_response")
    response = response if isinstance(response, dict) else {}
    form_id = response.get("form_id")
    token = response.get("token")

    # Typeform's own advice: a submission is (form, token, event type). The
    # partial and the final response of one respondent share the token. The
    # id is built from the full values; _bounded hashes it when too long.
    delivery_id = f"{form_id}:{token}:{topic}" if form_id and token else None
    return Delivery(
        source="typeform",
        topic=topic,
        delivery_id=_bounded(delivery_id, raw),
        account=_text(form_id),
        received_at=received_at,
        event_at=_text(response.get("submitted_at")),
        event_id=_text(body.get("event_id")),
        body=body,
    )


BUILDERS = {"shopify": shopify_delivery, "typeform": typeform_delivery}


def _topic(topic: str, origin: str) -> str:
    if not topic:
        raise DeliveryError(f"missing {origin}")
    if len(topic) > MAX_TOPIC_LENGTH or not topic.isprintable():
        raise DeliveryError(f"{origin} is not a topic name")
    return topic


def _bounded(delivery_id: str | None, raw: bytes) -> str:
    # Without an id the body's own hash dedupes exact resends.
    if not delivery_id:
        return "sha256-" + hashlib.sha256(raw).hexdigest()
    if len(delivery_id) > MAX_DELIVERY_ID_LENGTH or not delivery_id.isprintable():
        # surrogatepass: a lone surrogate from a JSON body still hashes.
        encoded = delivery_id.encode("utf-8", "surrogatepass")
        return "sha256-" + hashlib.sha256(encoded).hexdigest()
    return delivery_id


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = (headers.get(name) or "").strip()
    return value[:MAX_DELIVERY_ID_LENGTH] or None


def _text(value: Any) -> str | None:
    return str(value)[:MAX_DELIVERY_ID_LENGTH] if value not in (None, "") else None
