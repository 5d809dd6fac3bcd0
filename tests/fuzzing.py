"""Hypothesis settings for the hostile-input tests, and the count of inputs tried.

CI runs a modest number of examples per property; ``RELAY_FUZZ_EXAMPLES``
raises it for a deeper run, e.g. ``RELAY_FUZZ_EXAMPLES=5000 bin/test
tests/app/test_hostile_input.py``. The session prints how many inputs the
hostile-input tests tried, per test, at the end.
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "100"))

#: Inputs tried, by test name; printed at the end of the session.
TRIED: Counter = Counter()

settings.register_profile(
    "relay",
    max_examples=EXAMPLES,
    deadline=None,
    # No example database: nothing is written into the clone.
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("relay")


def tried(name: str, count: int = 1) -> None:
    TRIED[name] += count
