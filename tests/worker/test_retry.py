"""The retry schedule and Retry-After handling."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from worker.retry import (
    DEFAULT_RETRY_SCHEDULE_SECONDS,
    JITTER_FRACTION,
    next_delay,
    parse_retry_after,
)


def test_default_schedule_spans_more_than_a_day():
    assert sum(DEFAULT_RETRY_SCHEDULE_SECONDS) >= 24 * 3600
    assert 8 <= len(DEFAULT_RETRY_SCHEDULE_SECONDS) <= 10


def test_delays_follow_the_schedule_with_bounded_jitter():
    rng = random.Random(7)
    for index, base in enumerate(DEFAULT_RETRY_SCHEDULE_SECONDS):
        delay = next_delay(index, DEFAULT_RETRY_SCHEDULE_SECONDS, rng=rng)
        assert base <= delay <= math.ceil(base * (1 + JITTER_FRACTION))


def test_no_delay_once_the_schedule_is_spent():
    assert next_delay(3, (1, 2, 3)) is None


def test_retry_after_wins_when_longer_but_is_capped():
    schedule = (10, 20, 600)
    assert next_delay(0, schedule, retry_after=300, rng=random.Random(1)) == 301
    assert next_delay(0, schedule, retry_after=10**9) == 601
    assert next_delay(2, schedule, retry_after=1, rng=random.Random(1)) >= 600
    # A short Retry-After still gets its slack second over a short delay.
    assert next_delay(0, (1, 1), retry_after=1, rng=random.Random(1)) == 2


def test_retry_after_reads_seconds_and_http_dates():
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after("120") == 120
    assert parse_retry_after(later, now=now) == 90
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert (
        parse_retry_after(
            format_datetime(now - timedelta(days=1), usegmt=True), now=now
        )
        == 0
    )


def test_non_ascii_digits_in_retry_after_are_ignored():
    assert parse_retry_after("\u00b2") is None
    assert parse_retry_after("\u0663") is None  # Arabic-Indic three
