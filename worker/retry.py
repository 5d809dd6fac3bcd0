"""When to try a failed delivery again: the schedule and one pure function.

Shopify stops retrying a webhook after about 4 hours and Typeform after about
10, so once the relay has answered 2xx it alone carries the event. The default
schedule therefore spans about 25 hours: a Copernica outage of a day still
ends in delivery. Every delay gets up to 20 % random jitter so that deliveries
failed by one outage do not all come back in the same second.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

#: Delays before attempt 2, 3, ... in seconds (9 retries, 10 attempts in all).
DEFAULT_RETRY_SCHEDULE_SECONDS: tuple[int, ...] = (
    30,
    120,
    600,
    1800,
    3600,
    3 * 3600,
    6 * 3600,
    6 * 3600,
    8 * 3600,
)

#: Share of a delay added at random, so retries of one outage spread out.
JITTER_FRACTION = 0.2


def next_delay(
    retries_done: int,
    schedule: Sequence[int],
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> int | None:
    """Seconds to wait before the next attempt, or None when retries are spent.

    ``retries_done`` counts the retries already made (0 after the first
    attempt failed). A server's ``Retry-After`` replaces the scheduled delay
    when it is longer, but never exceeds the schedule's longest delay, so a
    huge value cannot park an event for weeks.
    """
    if retries_done >= len(schedule):
        return None

    delay = float(schedule[retries_done])
    delay += delay * JITTER_FRACTION * (rng or random).random()
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, float(max(schedule)))
    return max(1, round(delay))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Read a Retry-After header: whole seconds or an HTTP date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds)
