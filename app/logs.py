"""Structured logs shared by web, worker and CLI, and masking of personal data.

Each event is one line: JSON for log collectors, or ``key=value`` text when a
person watches a terminal. Callers pass facts as ``extra={"fields": {...}}``;
the delivery id is always among them. Personal data is masked before it is
logged; secrets and tokens are never handed to a logger at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

EMAIL = re.compile(r"^([^@\s]{1,64})@([^@\s]+)$")
#: An email address inside free text (an error message, a reason). "=" is
#: left out of the local part so "email==a@b.se" keeps its "email==".
EMAIL_IN_TEXT = re.compile(r"[^\s@'\"<>(),;:=]{1,64}@[^\s@'\"<>(),;:=]+")
#: A phone number in E.164 style inside free text: "+" and at least 8 digits.
PHONE_IN_TEXT = re.compile(r"\+\d[\d ().-]{6,}\d")
PHONE = re.compile(r"^\+?[\d\s().-]{7,}$")

RELAY_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Copernica field names that hold a person's name, address or birthday.
PERSONAL_FIELD_HINTS = (
    "name",
    "phone",
    "mobile",
    "address",
    "street",
    "zip",
    "postal",
    "birth",
)


class LineFormatter(logging.Formatter):
    def __init__(self, as_json: bool):
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        event.update(getattr(record, "fields", {}))
        if record.exc_info:
            event["error"] = self.formatException(record.exc_info)
        # Callers mask what they log; this catches an address or a phone
        # number that slipped into a message, an error or an exception.
        event = {name: _scrub(value) for name, value in event.items()}

        if self.as_json:
            line = json.dumps(event, ensure_ascii=False, default=str)
        else:
            time, level = event.pop("time"), event.pop("level")
            event.pop("logger")
            head = f"{time} {level:7} {_plain(event.pop('event'), quote_spaces=False)}"
            tail = " ".join(f"{key}={_plain(value)}" for key, value in event.items())
            line = f"{head} {tail}".rstrip()
        # A lone surrogate from a sender's JSON cannot be written as UTF-8.
        return line.encode("utf-8", "backslashreplace").decode("utf-8")


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        # Most values hold neither character; they skip the regexes.
        return mask_text(value) if "@" in value or "+" in value else value
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    if isinstance(value, dict):
        return {name: _scrub(item) for name, item in value.items()}
    return value


def _plain(value: Any, quote_spaces: bool = True) -> str:
    """A value for text logs; anything that could fake a new line is quoted."""
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, default=str, ensure_ascii=False)
    )
    if not text.isprintable() or (quote_spaces and (" " in text or not text)):
        return json.dumps(text, ensure_ascii=False)
    return text


def configure_logging(stream=None) -> None:
    """Send the relay's and RQ's records through one formatter, once."""
    stream = stream or sys.stderr
    fmt = os.environ.get("LOG_FORMAT", "").lower()
    as_json = fmt == "json" or (fmt != "text" and not stream.isatty())
    level = os.environ.get("LOG_LEVEL", "INFO").upper()

    level = logging.getLevelName(level) if level in RELAY_LEVELS else logging.INFO
    # RQ's own info lines (four per job) repeat what the relay's one line per
    # delivery says; they show at DEBUG, its warnings and errors always.
    rq_level = level if level == logging.DEBUG else max(level, logging.WARNING)

    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(as_json))
    for name, logger_level in (("relay", level), ("rq", rq_level)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logger_level)
        logger.propagate = False

    # rq.worker sets itself to INFO when imported; its children follow "rq".
    for name in ("rq.worker", "rq.job", "rq.queue", "rq.scheduler"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def mask(value: Any) -> Any:
    """A value as it may appear in a log: emails and phone numbers masked."""
    if not isinstance(value, str):
        return value
    email = EMAIL.match(value)
    if email:
        return f"{email.group(1)[0]}***@{email.group(2)}"
    if PHONE.match(value):
        return f"***{value[-2:]}"
    return value


def mask_text(text: str) -> str:
    """Free text (a reason, an error) with email addresses and international
    phone numbers in it masked."""
    text = EMAIL_IN_TEXT.sub(lambda found: mask(found.group(0)), text)
    return PHONE_IN_TEXT.sub(lambda found: f"***{found.group(0)[-2:]}", text)


def mask_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Profile fields for a log line; names, addresses and the like masked."""
    masked = {}
    for name, value in fields.items():
        lowered = name.lower()
        if isinstance(value, str) and any(h in lowered for h in PERSONAL_FIELD_HINTS):
            masked[name] = f"{value[:1]}***" if value else value
        else:
            masked[name] = mask(value)
    return masked


def mask_selector(selector) -> list[str]:
    return [f"{name}=={mask(value)}" for name, value in selector]
