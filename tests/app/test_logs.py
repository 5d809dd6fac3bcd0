"""Log lines: one per event, personal data masked, nothing that fakes a line."""

from __future__ import annotations

import io
import json
import logging

from app.logs import LineFormatter, configure_logging, mask, mask_fields


def record(message: str, **fields) -> logging.LogRecord:
    entry = logging.LogRecord(
        "relay.test", logging.INFO, __file__, 1, message, (), None
    )
    entry.fields = fields
    return entry


def test_json_lines_carry_the_fields():
    line = LineFormatter(as_json=True).format(record("queued", delivery="d-1"))
    event = json.loads(line)
    assert event["event"] == "queued" and event["delivery"] == "d-1"


def test_text_lines_quote_anything_that_could_fake_a_line():
    line = LineFormatter(as_json=False).format(
        record("webhook\nfake", topic="a\nlevel=error", name="two words")
    )
    assert "\n" not in line
    assert 'topic="a\\nlevel=error"' in line
    assert 'name="two words"' in line


def test_lone_surrogates_do_not_break_logging():
    for as_json in (True, False):
        line = LineFormatter(as_json).format(record("x", token="\ud800"))
        line.encode("utf-8")


def test_emails_phones_and_names_are_masked():
    assert mask("zoe.angstrom+shop@example.com") == "z***@example.com"
    assert mask("+46701740605") == "***05"
    assert mask_fields(
        {"firstname": "Zoë", "lastname": "Ångström", "total": "9", "email": "a@b.se"}
    ) == {"firstname": "Z***", "lastname": "Å***", "total": "9", "email": "a***@b.se"}


def test_log_level_applies_to_rq_too(monkeypatch):
    import rq.worker  # noqa: F401 - sets rq.worker to INFO on import

    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    configure_logging(io.StringIO())
    assert not logging.getLogger("rq.worker").isEnabledFor(logging.INFO)
    assert not logging.getLogger("relay.web").isEnabledFor(logging.INFO)

    monkeypatch.setenv("LOG_LEVEL", "INFO")
    configure_logging(io.StringIO())
    assert logging.getLogger("relay.web").isEnabledFor(logging.INFO)
    assert not logging.getLogger("rq.worker").isEnabledFor(logging.INFO)


def test_personal_data_that_slips_into_any_field_is_masked():
    try:
        raise KeyError("no profile for zoe.angstrom@example.com")
    except KeyError:
        import sys

        entry = record("failed for kim@example.com", reason="call +46 70 174 06 05")
        entry.fields["selector"] = ["email==kim@example.com"]
        entry.exc_info = sys.exc_info()
    line = LineFormatter(as_json=True).format(entry)
    event = json.loads(line)

    for leaked in ("zoe.angstrom@", "kim@", "174 06"):
        assert leaked not in line
    assert event["event"] == "failed for k***@example.com"
    assert event["selector"] == ["email==k***@example.com"]
    assert "z***@example.com" in event["error"]
    # Masked values stay as they are.
    assert (
        LineFormatter(as_json=True)
        .format(record("x", selector=["email==k***@example.com"], time_zone="+02:00"))
        .count("k***@example.com")
        == 1
    )
