"""How a finished delivery run is summed up for its log line and the metrics."""

from __future__ import annotations

from worker.jobs import ending_of


def calls(*outcomes: str) -> list[dict]:
    return [{"rule": f"r{i}", "outcome": o} for i, o in enumerate(outcomes)]


def test_any_applied_call_makes_the_run_applied():
    result = {"outcome": "mixed", "calls": calls("skipped", "applied")}
    assert ending_of(result, ["older_event"]) == ("applied", "")


def test_a_run_that_only_skipped_says_why_first():
    result = {"outcome": "skipped", "calls": calls("skipped", "skipped")}
    assert ending_of(result, ["no_key", "older_event"]) == ("skipped", "no_key")


def test_unmapped_dry_and_privacy_runs():
    assert ending_of({"outcome": "unmapped", "calls": []}, []) == (
        "skipped",
        "unmapped",
    )
    assert ending_of(
        {"outcome": "mixed", "calls": calls("dry_run", "skipped")}, ["no_key"]
    ) == ("dry_run", "")
    for privacy in ("redacted", "acknowledged"):
        assert ending_of({"outcome": privacy, "calls": []}, []) == ("applied", "")
    redact_nobody = {"outcome": "skipped", "calls": calls("skipped")}
    assert ending_of(redact_nobody, ["no_customer"]) == ("skipped", "no_customer")
