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

A delivery takes the lock and reads its marks in one round trip (``hold``),
and raises its marks and releases the lock in another (``finish``): no other
delivery can move a mark while the lock is held, so marks read with the lock
stay true until it is released.
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

#: Takes the lock (KEYS[1]) for ARGV[1] for ARGV[2] ms; when taken, returns
#: the values of KEYS[2..] (marks, and any other key the delivery reads
#: first), so they cost no round trip of their own. '' stands for none.
HOLD = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
local values = {}
for i = 2, #KEYS do
  values[i - 1] = redis.call('GET', KEYS[i]) or ''
end
return values
"""

#: Raises each mark (KEYS[2], KEYS[4], ...) to its time (ARGV[3], ARGV[5],
#: ...) unless it is already beyond, naming the delivery (ARGV[4], ...) in the
#: key that follows it (at an equal time, the latest delivery), keeps their
#: TTL fresh, then deletes the lock KEYS[1] if ARGV[2] is 1 and it still holds
#: ARGV[1].
FINISH = """
local ttl = ARGV[#ARGV]
for i = 2, #KEYS, 2 do
  local current = tonumber(redis.call('GET', KEYS[i]))
  local candidate = tonumber(ARGV[i + 1])
  if current == nil or candidate >= current then
    redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ttl)
    redis.call('SET', KEYS[i + 1], ARGV[i + 2], 'EX', ttl)
  else
    redis.call('EXPIRE', KEYS[i], ttl)
    redis.call('EXPIRE', KEYS[i + 1], ttl)
  end
end
if ARGV[2] == '1' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
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
        self._marks: dict[str, float | None] = {}  # read while holding the lock
        self._by: dict[str, str | None] = {}  # who set those marks
        self._applied: dict[str, tuple[float, str]] = {}  # to raise at finish

    def hold(self, rules: list[str], read: tuple[str, ...] = ()) -> list | None:
        """Take the lock and, with it, read the marks of these rules (and who
        set them) and the keys in ``read``; their values (None when absent),
        or None if busy."""
        mark_keys = []
        for rule in rules:
            mark_keys += [self._mark_key(rule), self._by_key(rule)]
        keys = [self.lock_key, *read, *mark_keys]
        values = self.connection.register_script(HOLD)(keys, [self.token, self.lock_ms])
        if values is None:
            return None
        values = [value or None for value in values]
        marks = values[len(read) :]
        self._marks, self._by = {}, {}
        for index, rule in enumerate(rules):
            mark, by = marks[2 * index], marks[2 * index + 1]
            self._marks[rule] = float(mark) if mark is not None else None
            self._by[rule] = by.decode() if by is not None else None
        return values[: len(read)]

    def applied(self, rule: str, moment: float, delivery: str = "") -> None:
        """Copernica took this rule's write for ``delivery``: raise its mark
        at ``finish``."""
        by = delivery_digest(delivery) if delivery else ""
        earlier = self._applied.get(rule)
        if earlier is None or moment >= earlier[0]:
            self._applied[rule] = (moment, by)
        if moment >= (self._marks.get(rule) or moment):
            self._marks[rule] = moment
            self._by[rule] = by

    def pending(self) -> list[str]:
        """Rules applied whose marks ``finish`` has not written yet."""
        return list(self._applied)

    def finish(self, release: bool) -> None:
        """Raise the marks of what was applied; release the lock if asked."""
        rules = list(self._applied)
        if not rules and not release:
            return
        keys, args = [self.lock_key], [self.token, "1" if release else "0"]
        for rule in rules:
            moment, by = self._applied[rule]
            keys += [self._mark_key(rule), self._by_key(rule)]
            args += [repr(moment), by]
        self.connection.register_script(FINISH)(keys, [*args, self.mark_ttl])
        self._applied.clear()

    def acquire(self) -> bool:
        return bool(
            self.connection.set(self.lock_key, self.token, nx=True, px=self.lock_ms)
        )

    def release(self) -> None:
        self.connection.eval(RELEASE_LOCK, 1, self.lock_key, self.token)

    def mark(self, rule: str) -> float | None:
        if rule in self._marks:
            return self._marks[rule]
        value = self.connection.get(self._mark_key(rule))
        return float(value) if value is not None else None

    def marked_by(self, rule: str, delivery: str) -> bool:
        """Whether ``delivery`` brought the rule's mark to its present time."""
        if rule in self._by:
            named = self._by[rule]
        else:
            value = self.connection.get(self._by_key(rule))
            named = value.decode() if value is not None else None
        return named == delivery_digest(delivery)

    def _mark_key(self, rule: str) -> str:
        return self.mark_prefix + hashlib.sha256(rule.encode()).hexdigest()[:12]

    def _by_key(self, rule: str) -> str:
        return self._mark_key(rule) + ":by"
