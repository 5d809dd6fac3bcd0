"""One writer per profile, newest data wins: the per-selector lock and order marks.

Webhooks arrive out of order (a Shopify ``customers/update`` before its
``create``, a retried old payload after newer ones), and Copernica's upsert
is not atomic: two concurrent ``create=1`` PUTs for one new email can both
create a profile. So, per Copernica selector:

- a **lock** (Redis ``SET NX`` with a timeout) lets one delivery at a time call
  Copernica; a delivery that finds it taken is rescheduled shortly;
- an **order mark** remembers the event time of the newest event applied by
  each rule, and which delivery brought it. An older event is skipped, and
  so is that same delivery sent again (a replay after the dedupe window).
  The mark is written, as a maximum in one Lua call, only after Copernica
  accepted the PUT.

Marks are kept per rule because each rule writes its own set of fields: an
older consent event must still apply after a newer customer update.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import redis

LOCK_PREFIX = "relay:lock:"
MARK_PREFIX = "relay:mark:"

#: Deletes a lock only while it still holds this worker's token.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: Raises a mark to ARGV[1] unless it is already beyond; keeps TTL fresh.
#: KEYS[2] names the delivery (ARGV[3]) that brought the mark's time, so a
#: replay of it is known; at an equal time the latest delivery is named.
#: Returns the mark in force afterwards.
RAISE_MARK = """
local current = tonumber(redis.call('GET', KEYS[1]))
local candidate = tonumber(ARGV[1])
if current == nil or candidate >= current then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
  return ARGV[1]
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return tostring(current)
"""


def event_time(
    body: Mapping[str, Any], event_at: str | None, source: str
) -> float | None:
    """When the event happened, as epoch seconds, or None when nobody says.

    Shopify: the resource's ``updated_at``, else ``X-Shopify-Triggered-At``
    (a retry keeps the original trigger time). Typeform: ``submitted_at``.
    """
    candidates = [event_at]
    if source == "shopify":
        candidates.insert(0, body.get("updated_at"))
    for candidate in candidates:
        moment = parse_time(candidate)
        if moment is not None:
            return moment
    return None


def parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    # More than six fractional digits (Shopify sends nine) are cut to six.
    head, dot, rest = text.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def selector_digest(database: str, selector: tuple[tuple[str, str], ...]) -> str:
    # Field names compare case-insensitively in Copernica; values do not.
    text = "\x1f".join(f"{name.lower()}={value}" for name, value in selector)
    return hashlib.sha256(f"{database}\x1e{text}".encode()).hexdigest()[:32]


def delivery_digest(delivery: str) -> str:
    # A delivery id may carry a shop's or form's name; Redis keeps a digest.
    return hashlib.sha256(delivery.encode()).hexdigest()[:24]


class ProfileGuard:
    """Lock and order marks for one selector in one database."""

    def __init__(
        self,
        connection: redis.Redis,
        database: str,
        selector: tuple[tuple[str, str], ...],
        lock_seconds: float,
        mark_ttl_seconds: int,
    ):
        self.connection = connection
        digest = selector_digest(database, selector)
        self.lock_key = f"{LOCK_PREFIX}{digest}"
        self.mark_prefix = f"{MARK_PREFIX}{digest}:"
        self.lock_ms = int(lock_seconds * 1000)
        self.mark_ttl = mark_ttl_seconds
        self.token = secrets.token_hex(8)

    def acquire(self) -> bool:
        return bool(
            self.connection.set(self.lock_key, self.token, nx=True, px=self.lock_ms)
        )

    def release(self) -> None:
        self.connection.eval(RELEASE_LOCK, 1, self.lock_key, self.token)

    def mark(self, rule: str) -> float | None:
        value = self.connection.get(self._mark_key(rule))
        return float(value) if value is not None else None

    def raise_mark(self, rule: str, moment: float, delivery: str = "") -> float:
        key = self._mark_key(rule)
        result = self.connection.eval(
            RAISE_MARK,
            2,
            key,
            key + ":by",
            repr(moment),
            self.mark_ttl,
            delivery_digest(delivery) if delivery else "",
        )
        return float(result)

    def marked_by(self, rule: str, delivery: str) -> bool:
        """Whether ``delivery`` brought the rule's mark to its present time."""
        named = self.connection.get(self._mark_key(rule) + ":by")
        return named is not None and named.decode() == delivery_digest(delivery)

    def _mark_key(self, rule: str) -> str:
        return self.mark_prefix + hashlib.sha256(rule.encode()).hexdigest()[:12]
