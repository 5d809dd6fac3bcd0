"""The mapping's helper functions."""

from __future__ import annotations

import json

import jmespath

from tests.harness import FIXTURES
from worker.expressions import OPTIONS

FORM = json.loads((FIXTURES / "typeform" / "form_response.json").read_bytes())


def search(expression, data):
    return jmespath.search(expression, data, options=OPTIONS)


def test_answer_by_ref_unwraps_each_type():
    answers = "form_response.answers"
    assert search(f"answer({answers}, 'email')", FORM) == (
        "jose.nunez+newsletter@example.com"
    )
    assert search(f"answer({answers}, 'preferred_store')", FORM) == "Göteborg"
    assert search(f"answer({answers}, 'interests')", FORM) == [
        "Textiles & throws",
        "Candles",
        "Sauna accessories",
    ]
    assert search(f"answer({answers}, 'sms_opt_in')", FORM) is False
    assert search(f"answer({answers}, 'household_size')", FORM) == 3
    assert search(f"answer({answers}, 'company')", FORM) is None


def test_copernica_datetime_converts_to_amsterdam_time():
    assert search("copernica_datetime(t)", {"t": "2026-08-14T08:06:47Z"}) == (
        "2026-08-14 10:06:47"
    )
    assert search("copernica_datetime(t)", {"t": "2026-01-14T10:00:00+02:00"}) == (
        "2026-01-14 09:00:00"
    )
    assert (
        search("copernica_datetime(t)", {"t": "2026-08-14T08:24:42.118309517Z"})
        == "2026-08-14 10:24:42"
    )
    assert search("copernica_datetime(t)", {"t": "yesterday"}) is None
    assert search("copernica_datetime(missing)", {}) is None
    assert search("copernica_date(t)", {"t": "2026-08-14T23:30:00Z"}) == "2026-08-15"


def test_join_values_skips_empty_items():
    assert search("join_values(', ', x)", {"x": ["a", None, "", 2, True]}) == (
        "a, 2, yes"
    )
    assert search("join_values(', ', x)", {"x": []}) is None


def test_dates_at_the_edge_of_the_calendar_give_null():
    assert search("copernica_datetime(t)", {"t": "9999-12-31T23:59:59-05:00"}) is None
    assert search("copernica_date(t)", {"t": "0001-01-01T00:00:00+05:00"}) is None
