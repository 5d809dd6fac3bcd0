"""Mapping rules: which webhook becomes which Copernica profile update.

A YAML file lists rules. Each rule names a source and topics, the Copernica
fields that select the profile (``key``) and a JMESPath expression per field.
Loading checks the whole file and raises MappingError naming the rule at
fault, so a bad mapping stops a process at start instead of failing every
delivery later. Applying rules is pure: a delivery in, profile updates out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jmespath
import jmespath.exceptions
import yaml

from worker.expressions import OPTIONS, function_problems

SOURCES = ("shopify", "typeform")
RULE_KEYS = {
    "name",
    "source",
    "topics",
    "forms",
    "database",
    "key",
    "create",
    "async",
    "fields",
    "collection",
}
COLLECTION_KEYS = {"name", "key", "fields", "each"}
PRIVACY_KEYS = {"database", "match", "clear", "action"}
PRIVACY_ACTIONS = ("clear", "delete")


class MappingError(Exception):
    """The mapping file cannot be used; the message names the rule."""


class MappedValueError(Exception):
    """An expression produced a value Copernica cannot store (a list or object)."""


@dataclass(frozen=True)
class CollectionRule:
    """Subprofiles to upsert under the rule's profile, e.g. an order."""

    name: str  # collection name or id
    key: tuple[str, ...]
    fields: Mapping[str, Any]  # Copernica field -> compiled expression
    each: Any = None  # compiled expression giving a list, or None: one item


@dataclass(frozen=True)
class Rule:
    name: str
    source: str
    topics: tuple[str, ...]
    forms: tuple[str, ...]
    database: str | None
    key: tuple[str, ...]
    create: bool
    async_: bool
    fields: Mapping[str, Any]  # Copernica field -> compiled JMESPath expression
    collection: CollectionRule | None = None

    @property
    def field_names(self) -> set[str]:
        return set(self.fields)

    def matches(self, source: str, topic: str, body: Mapping[str, Any]) -> bool:
        if source != self.source or topic not in self.topics:
            return False
        if self.forms:
            form_id = (body.get("form_response") or {}).get("form_id")
            return form_id in self.forms
        return True


@dataclass(frozen=True)
class SubprofileUpdate:
    """One PUT profile/{id}/subprofiles/{collection} call, once the id is known."""

    collection: str
    selector: tuple[tuple[str, str], ...]
    fields: Mapping[str, Any]

    @property
    def label(self) -> str:
        return f"{self.collection}:" + ",".join(f"{n}={v}" for n, v in self.selector)


@dataclass(frozen=True)
class ProfileUpdate:
    """One PUT database/{id}/profiles call, before any wire format."""

    rule: str
    database: str | None
    selector: tuple[tuple[str, str], ...]  # (field, value) pairs, ANDed
    fields: Mapping[str, Any]
    create: bool
    async_: bool
    subprofiles: tuple[SubprofileUpdate | Skipped, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A rule matched but no call may be made; the reason says why."""

    rule: str
    reason: str


def load_rules(settings) -> list[Rule]:
    """The mapping in effect for ``settings``, checked as the processes need it.

    When the relay sends for real, every rule needs a database: a rule without
    one would fail every delivery it matches.
    """
    rules = load_mapping(settings.mappings_path, settings.copernica_database)
    if not settings.dry_run:
        missing = [rule.name for rule in rules if rule.database is None]
        if missing:
            raise MappingError(
                f"{settings.mappings_path}: rule(s) {', '.join(missing)} name no "
                "database and COPERNICA_DATABASE is not set"
            )
    return rules


def load_mapping(path: Path, default_database: str | None = None) -> list[Rule]:
    """Read and check a mapping file; raise MappingError on the first bad rule."""
    document = read_document(path)
    rules = parse_mapping(document, default_database, origin=str(path))
    parse_privacy(document, default_database, origin=str(path))
    return rules


def load_privacy(path: Path, default_database: str | None = None) -> PrivacyRule:
    return parse_privacy(read_document(path), default_database, origin=str(path))


def read_document(path: Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise MappingError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise MappingError(f"{path}: not valid YAML: {error}") from None


def parse_mapping(
    document: Any, default_database: str | None = None, origin: str = "mapping"
) -> list[Rule]:
    if not isinstance(document, dict) or not isinstance(document.get("rules"), list):
        raise MappingError(f"{origin}: expected a top-level 'rules:' list")

    rules = []
    for index, raw in enumerate(document["rules"], start=1):
        label = _label(index, raw)
        try:
            rules.append(_parse_rule(label, raw, default_database))
        except MappingError as error:
            raise MappingError(f"{origin}: {label}: {error}") from None
    return rules


def _label(index: int, raw: Any) -> str:
    if isinstance(raw, dict) and raw.get("name"):
        return f"rule {index} ({raw['name']})"
    if isinstance(raw, dict):
        return f"rule {index} ({raw.get('source')} {raw.get('topics')})"
    return f"rule {index}"


def _parse_rule(label: str, raw: Any, default_database: str | None) -> Rule:
    if not isinstance(raw, dict):
        raise MappingError("a rule must be a mapping of settings")
    unknown = set(raw) - RULE_KEYS
    if unknown:
        raise MappingError(f"unknown setting(s): {', '.join(sorted(unknown))}")

    source = raw.get("source")
    if source not in SOURCES:
        raise MappingError(
            f"source must be one of {', '.join(SOURCES)}, got {source!r}"
        )

    topics = _strings(raw.get("topics"), "topics", required=True)
    forms = _strings(raw.get("forms"), "forms", required=False)
    if forms and source != "typeform":
        raise MappingError(
            "'forms' filters Typeform form ids; it needs source typeform"
        )

    compiled = _compile_fields(raw.get("fields"))
    key = _key(raw.get("key"), compiled)
    collection = _parse_collection(raw.get("collection"))
    if collection and raw.get("async"):
        raise MappingError(
            "a rule with a collection needs async: false: the profile must exist "
            "before its subprofiles are written"
        )

    database = raw.get("database", default_database)
    if database is not None and str(database).strip() in ("", ".", ".."):
        raise MappingError(f"database {database!r} is not a database id or name")
    return Rule(
        name=str(raw.get("name") or label),
        source=source,
        topics=topics,
        forms=forms,
        database=None if database is None else str(database),
        key=key,
        create=_flag(raw, "create"),
        async_=_flag(raw, "async"),
        fields=compiled,
        collection=collection,
    )


def _compile_fields(fields: Any, setting: str = "fields") -> dict[str, Any]:
    if not isinstance(fields, dict) or not fields:
        raise MappingError(f"'{setting}' must map Copernica fields to expressions")
    return {
        str(name): _compile(expression, f"field {name!r}")
        for name, expression in fields.items()
    }


def _compile(expression: Any, label: str) -> Any:
    if not isinstance(expression, str) or not expression.strip():
        raise MappingError(f"{label}: expression must be a string")
    try:
        compiled = jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as error:
        raise MappingError(
            f"{label}: invalid expression {expression!r}: {error}"
        ) from None
    problems = function_problems(expression)
    if problems:
        raise MappingError(f"{label}: {'; '.join(problems)}")
    return compiled


def _key(raw: Any, compiled: Mapping[str, Any], setting: str = "key") -> tuple:
    key = _strings(raw, setting, required=True)
    missing = [name for name in key if name not in compiled]
    if missing:
        raise MappingError(f"{setting} field(s) not in fields: {', '.join(missing)}")
    return key


def _parse_collection(raw: Any) -> CollectionRule | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise MappingError("'collection' must be a mapping of settings")
    unknown = set(raw) - COLLECTION_KEYS
    if unknown:
        raise MappingError(
            f"collection: unknown setting(s): {', '.join(sorted(unknown))}"
        )
    name = raw.get("name")
    if not isinstance(name, str | int) or not str(name).strip():
        raise MappingError("collection: 'name' must be a collection name or id")
    fields = _compile_fields(raw.get("fields"), "collection fields")
    return CollectionRule(
        name=str(name),
        key=_key(raw.get("key"), fields, "collection key"),
        fields=fields,
        each=_compile(raw["each"], "collection each") if "each" in raw else None,
    )


@dataclass(frozen=True)
class PrivacyRule:
    """What a Shopify customers/redact does to the matching Copernica profiles."""

    database: str | None
    match: Mapping[str, Any]  # Copernica field -> expression over the body
    clear: tuple[str, ...]  # fields blanked by the "clear" action
    action: str  # clear | delete


#: Without a privacy section: match by email and by the customer id field of
#: the bundled mapping, and blank the personal fields it writes.
DEFAULT_PRIVACY = {
    "match": {"email": "email(customer.email)", "shopify_customer_id": "customer.id"},
    "clear": [
        "email",
        "firstname",
        "lastname",
        "phone",
        "city",
        "country",
        "shopify_customer_id",
    ],
    "action": "clear",
}


def parse_privacy(
    document: Any, default_database: str | None = None, origin: str = "mapping"
) -> PrivacyRule:
    raw = document.get("privacy", DEFAULT_PRIVACY) if isinstance(document, dict) else {}
    try:
        if not isinstance(raw, dict):
            raise MappingError("must be a mapping of settings")
        unknown = set(raw) - PRIVACY_KEYS
        if unknown:
            raise MappingError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        action = raw.get("action", "clear")
        if action not in PRIVACY_ACTIONS:
            raise MappingError(
                f"action must be one of {', '.join(PRIVACY_ACTIONS)}, got {action!r}"
            )
        database = raw.get("database", default_database)
        return PrivacyRule(
            database=None if database is None else str(database),
            match=_compile_fields(raw.get("match"), "match"),
            clear=_strings(raw.get("clear"), "clear", required=action == "clear"),
            action=action,
        )
    except MappingError as error:
        raise MappingError(f"{origin}: privacy: {error}") from None


def _strings(value: Any, setting: str, required: bool) -> tuple[str, ...]:
    if value is None and not required:
        return ()
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, str | int) and str(item) for item in value)
    ):
        raise MappingError(f"'{setting}' must be a non-empty list of names")
    return tuple(str(item) for item in value)


def _flag(raw: dict, setting: str) -> bool:
    value = raw.get(setting, False)
    if not isinstance(value, bool):
        raise MappingError(f"'{setting}' must be true or false, got {value!r}")
    return value


def apply_rules(
    rules: Sequence[Rule], source: str, topic: str, body: Mapping[str, Any]
) -> list[ProfileUpdate | Skipped]:
    """Every matching rule's outcome for one delivery, in mapping order."""
    return [_apply(rule, body) for rule in rules if rule.matches(source, topic, body)]


def _apply(rule: Rule, body: Mapping[str, Any]) -> ProfileUpdate | Skipped:
    values = evaluate(rule.fields, body, rule.name)
    selector = _selector(rule.key, values)
    if isinstance(selector, str):
        return Skipped(rule.name, selector)

    subprofiles: tuple[SubprofileUpdate | Skipped, ...] = ()
    if rule.collection:
        subprofiles = _subprofiles(rule, body)

    return ProfileUpdate(
        rule=rule.name,
        database=rule.database,
        selector=selector,
        fields=values,
        create=rule.create,
        async_=rule.async_,
        subprofiles=subprofiles,
    )


def _subprofiles(rule: Rule, body: Mapping[str, Any]) -> tuple:
    collection = rule.collection
    items: Any = [body]
    if collection.each is not None:
        items = _search(collection.each, body, f"{rule.name}: collection each")
        if not isinstance(items, list):
            items = [] if items is None else [items]

    updates = []
    for item in items:
        label = f"{rule.name}: collection {collection.name}"
        values = evaluate(collection.fields, item, label)
        selector = _selector(collection.key, values)
        if isinstance(selector, str):
            updates.append(Skipped(label, selector))
        else:
            updates.append(SubprofileUpdate(collection.name, selector, values))
    return tuple(updates)


def evaluate(fields: Mapping[str, Any], data: Any, label: str) -> dict[str, Any]:
    """Each field's value from ``data``; nulls left out, lists refused."""
    values = {}
    for field_name, expression in fields.items():
        value = _search(expression, data, f"{label}: field {field_name!r}")
        if value is None:
            # A webhook never blanks a profile field by leaving it out.
            continue
        if isinstance(value, list | dict):
            raise MappedValueError(
                f"{label}: field {field_name!r} evaluated to a "
                f"{type(value).__name__}; Copernica fields hold single values "
                "(join lists with join_values)"
            )
        values[field_name] = value
    return values


def _search(expression: Any, data: Any, label: str) -> Any:
    try:
        return expression.search(data, options=OPTIONS)
    except Exception as error:
        # JMESPath type errors quote the offending value, which may be
        # personal data; the reason names only the rule and the field.
        raise MappedValueError(
            f"{label}: expression failed on this body ({type(error).__name__})"
        ) from None


def _selector(key: tuple[str, ...], values: dict[str, Any]) -> tuple | str:
    """The (field, value) filters, or the reason no safe selector exists."""
    selector = []
    for field_name in key:
        text, problem = selector_text(values.get(field_name))
        if problem:
            return f"key field {field_name!r} {problem}"
        if isinstance(values[field_name], str):
            # The profile must store the key exactly as the next selector
            # will look for it, or the next webhook creates a second profile.
            values[field_name] = text
        selector.append((field_name, text))
    return tuple(selector)


def privacy_selectors(privacy: PrivacyRule, body: Mapping[str, Any]) -> list[tuple]:
    """One single-field selector per match expression that gives a usable value."""
    values = evaluate(privacy.match, body, "privacy")
    selectors = []
    for field_name in privacy.match:
        text, problem = selector_text(values.get(field_name))
        if not problem:
            selectors.append(((field_name, text),))
    return selectors


#: What Copernica (PHP's trim) strips from both ends of a filter expression.
COPERNICA_TRIM = " \t\n\r\0\x0b"

#: Characters Copernica's filter operators are made of.
OPERATOR_CHARACTERS = "=<>!~"


def selector_text(value: Any) -> tuple[str, str | None]:
    """A key value as a ``fields[]`` filter compares it, or why it cannot be one.

    Only text and whole numbers select a profile. Empty text, and text with
    control characters, are refused: Copernica trims NUL and other controls
    from the filter, so ``email==\\0`` would select every profile whose email
    is blank.
    """
    if value is None:
        return "", "is missing or empty"
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return "", f"is a {type(value).__name__}, not text or a number"
    if isinstance(value, float):
        if not value.is_integer():
            return "", "is not a whole number"
        value = int(value)

    text = str(value).strip(COPERNICA_TRIM)
    if not text:
        return "", "is missing or empty"
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        return "", "contains control characters"
    if text[0] in OPERATOR_CHARACTERS:
        # "email===x" or "id==<5": how Copernica splits an operator run is
        # observed, not documented; a key that starts with one is refused.
        return "", "starts with an operator character (= < > ! ~)"
    return text, None
