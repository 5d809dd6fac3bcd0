"""JMESPath helpers for mapping rules, on top of standard JMESPath.

- ``answer(answers, ref)``: the value of the Typeform answer whose question has
  that ``ref``, unwrapped by answer type (a choice gives its label, several
  choices their labels, a boolean stays a boolean); null when not answered.
- ``copernica_datetime(text)``: an ISO-8601 time as ``YYYY-MM-DD HH:MM:SS`` in
  Copernica's own time zone (Europe/Amsterdam); null when unreadable.
- ``copernica_date(text)``: the same, date only (``YYYY-MM-DD``).
- ``join_values(glue, list)``: the non-empty items as text, joined; null when
  none are left.
- ``email(text)``: an email address trimmed with its domain in lower case, so
  ``Zoe@Example.COM`` and ``Zoe@example.com`` select the same profile.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import jmespath
import jmespath.functions

#: Copernica stores dates without a zone and reads them as Amsterdam time.
COPERNICA_TIMEZONE = ZoneInfo("Europe/Amsterdam")


class RelayFunctions(jmespath.functions.Functions):
    @jmespath.functions.signature({"types": ["array", "null"]}, {"types": ["string"]})
    def _func_answer(self, answers, ref):
        for answer in answers or ():
            field = answer.get("field") if isinstance(answer, dict) else None
            if isinstance(field, dict) and field.get("ref") == ref:
                return answer_value(answer)
        return None

    @jmespath.functions.signature({"types": ["string", "null"]})
    def _func_copernica_datetime(self, text):
        moment = _parse_time(text)
        return None if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")

    @jmespath.functions.signature({"types": ["string", "null"]})
    def _func_copernica_date(self, text):
        moment = _parse_time(text)
        return None if moment is None else moment.strftime("%Y-%m-%d")

    @jmespath.functions.signature({"types": ["string", "null"]})
    def _func_email(self, text):
        return email_address(text)

    @jmespath.functions.signature({"types": ["string"]}, {"types": ["array", "null"]})
    def _func_join_values(self, glue, items):
        parts = [_text(item) for item in items or () if item not in (None, "")]
        return glue.join(parts) or None


OPTIONS = jmespath.Options(custom_functions=RelayFunctions())
FUNCTION_NAMES = frozenset(RelayFunctions.FUNCTION_TABLE)


def answer_value(answer: dict) -> Any:
    """One Typeform answer's value; choice objects become their labels."""
    kind = answer.get("type")
    value = answer.get(kind) if isinstance(kind, str) else None
    if kind == "choice" and isinstance(value, dict):
        return value.get("label") or value.get("other")
    if kind == "choices" and isinstance(value, dict):
        labels = list(value.get("labels") or ())
        if value.get("other"):
            labels.append(value["other"])
        return labels
    return value


def function_problems(expression: str) -> list[str]:
    """Calls JMESPath would only reject when run: unknown names, wrong arity."""
    problems = []
    for name, count in _function_calls(jmespath.compile(expression).parsed):
        spec = RelayFunctions.FUNCTION_TABLE.get(name)
        if spec is None:
            problems.append(f"unknown function {name}()")
            continue
        signature = spec["signature"]
        variadic = bool(signature) and signature[-1].get("variadic", False)
        if count < len(signature) or (count > len(signature) and not variadic):
            wanted = f"{len(signature)}{' or more' if variadic else ''}"
            problems.append(f"{name}() takes {wanted} argument(s), given {count}")
    return problems


def _function_calls(node: dict) -> list[tuple[str, int]]:
    calls = []
    stack = [node]
    while stack:
        current = stack.pop()
        if current.get("type") == "function_expression":
            calls.append((current["value"], len(current["children"])))
        stack.extend(c for c in current.get("children", ()) if isinstance(c, dict))
    return calls


def email_address(text: str | None) -> str | None:
    """An email address trimmed, its domain in lower case (the part before the
    @ is case-sensitive in principle and is kept as written)."""
    if not text or "@" not in text:
        return text
    local, _, domain = text.strip().rpartition("@")
    return f"{local}@{domain.lower()}"


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        # Python 3.11 reads "Z" and offsets; trim sub-microsecond digits that
        # Shopify's X-Shopify-Triggered-At sometimes carries.
        moment = datetime.fromisoformat(_trim_fraction(text.strip()))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(COPERNICA_TIMEZONE)
    except OverflowError:
        # Year 1 or 9999 shifted across midnight: no date Copernica can hold.
        return None


def _trim_fraction(text: str) -> str:
    head, dot, rest = text.partition(".")
    if not dot:
        return text
    digits = len(rest) - len(rest.lstrip("0123456789"))
    return f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"


def _text(item: Any) -> str:
    if isinstance(item, bool):
        return "yes" if item else "no"
    if isinstance(item, float) and item.is_integer():
        return str(int(item))
    return str(item)
