"""When to try a failed delivery again: the schedule and one pure function.

Shopify stops retrying a webhook after about 4 hours and Typeform after about
10, so once the relay has answered 2xx it alone carries the event. The default
schedule backs off exponentially (x4 from 30 s, capped at 8 h) over 9 retries
that span about 35 hours: a Copernica outage of a day still ends in delivery.
Every delay gets up to 20 % random jitter so that deliveries failed by one
outage do not all come back in the same second. (RudderStack, Svix and Hook0
space their retries the same way, over one to three days.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

#: The first retry waits this long, in seconds.
FIRST_DELAY_SECONDS = 30

#: Each retry waits this many times longer than the one before ...
BACKOFF_FACTOR = 4

#: ... but never longer than this, in seconds.
MAX_DELAY_SECONDS = 8 * 3600

#: Retries after the first attempt (10 attempts in all).
MAX_RETRIES = 9


def backoff_schedule(
    first: int = FIRST_DELAY_SECONDS,
    factor: int = BACKOFF_FACTOR,
    cap: int = MAX_DELAY_SECONDS,
    retries: int = MAX_RETRIES,
) -> tuple[int, ...]:
    """Delays before attempt 2, 3, ... in seconds."""
    return tuple(min(first * factor**n, cap) for n in range(retries))


#: 30 s, 2 min, 8 min, 32 min, ~2 h 8 min, then 8 h four times: ~35 h in all.
DEFAULT_RETRY_SCHEDULE_SECONDS = backoff_schedule()

#: Share of a delay added at random, so retries of one outage spread out.
JITTER_FRACTION = 0.2

#: Added to a server's Retry-After (see next_delay).
RETRY_AFTER_SLACK_SECONDS = 1


def next_delay(
    retries_done: int,
    schedule: Sequence[int],
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> int | None:
    """Seconds to wait before the next attempt, or None when retries are spent.

    ``retries_done`` counts the retries already made (0 after the first
    attempt failed). A server's ``Retry-After`` replaces the scheduled delay
    when it is longer, but is capped at the schedule's longest delay (plus
    the slack second), so a huge value cannot park an event for weeks.
    """
    if retries_done >= len(schedule):
        return None

    delay = float(schedule[retries_done])
    delay += delay * JITTER_FRACTION * (rng or random).random()
    if retry_after is not None:
        # RQ's scheduler keeps times in whole seconds and may run a job up to
        # a second early; the extra second keeps the retry from coming sooner
        # than the server asked.
        capped = min(math.ceil(retry_after), max(schedule))
        delay = max(delay, capped + RETRY_AFTER_SLACK_SECONDS)
    return max(1, math.ceil(delay))


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
