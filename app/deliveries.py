"""The delivery record: one verified webhook as the relay stores and queues it.

Built from a request's headers and parsed body by pure functions, one per
source. The record is plain data and travels as the RQ job's JSON argument, so
it is readable in Redis and survives upgrades of either side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: Delivery ids come from senders; longer ones are replaced by their hash so a
#: hostile header cannot bloat Redis keys or logs.
MAX_DELIVERY_ID_LENGTH = 200


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
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Delivery:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})

    @property
    def label(self) -> str:
        """How logs and job descriptions name it, without any personal data."""
        return f"{self.source} {self.topic} {self.delivery_id}"


def shopify_delivery(
    headers: Mapping[str, str], body: Mapping[str, Any], raw: bytes, received_at: str
) -> Delivery:
    topic = (headers.get("X-Shopify-Topic") or "").strip()
    if not topic:
        raise DeliveryError("missing X-Shopify-Topic header")

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
    if not isinstance(topic, str) or not topic:
        raise DeliveryError("body has no event_type")

    response = body.get("form_response")
    response = response if isinstance(response, dict) else {}
    form_id = _text(response.get("form_id"))
    token = _text(response.get("token"))

    # Typeform's own advice: a submission is (form, token, event type). The
    # partial and the final response of one respondent share the token.
    delivery_id = f"{form_id}:{token}:{topic}" if form_id and token else None
    return Delivery(
        source="typeform",
        topic=topic,
        delivery_id=_bounded(delivery_id, raw),
        account=form_id,
        received_at=received_at,
        event_at=_text(response.get("submitted_at")),
        event_id=_text(body.get("event_id")),
        body=body,
    )


BUILDERS = {"shopify": shopify_delivery, "typeform": typeform_delivery}


def _bounded(delivery_id: str | None, raw: bytes) -> str:
    # Without an id the body's own hash dedupes exact resends.
    if not delivery_id:
        return "sha256-" + hashlib.sha256(raw).hexdigest()
    if len(delivery_id) > MAX_DELIVERY_ID_LENGTH or not delivery_id.isprintable():
        return "sha256-" + hashlib.sha256(delivery_id.encode()).hexdigest()
    return delivery_id


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = (headers.get(name) or "").strip()
    return value[:MAX_DELIVERY_ID_LENGTH] or None


def _text(value: Any) -> str | None:
    return str(value)[:MAX_DELIVERY_ID_LENGTH] if value not in (None, "") else None
