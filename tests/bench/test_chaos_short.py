"""The short soak with faults runs in CI: nothing accepted may go missing."""

from __future__ import annotations

import pytest

from bench.chaos import SHORT, print_summary, run

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(150)
def test_short_soak_accounts_for_every_event(tmp_path):
    figures = run(SHORT, tmp_path)
    print_summary(figures)

    assert figures["problems"] == []
    assert figures["lost"] == 0
    assert figures["accepted"] == figures["events"]
    assert (
        figures["applied"] + figures["skipped"] + figures["failed"]
        == (figures["accepted"])
    )
    # The faults really happened: a worker was killed, Redis and web restarted.
    happened = " ".join(what for _, what in figures["timeline"])
    for fault in ("SIGKILL", "Redis started", "503 for", "429", "hangs", "web process"):
        assert fault in happened
