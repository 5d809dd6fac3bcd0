"""Which fields a Copernica database (and its collections) really has.

Copernica silently ignores a ``fields[]`` filter on a field it does not know;
on a PUT that could update every profile of the database. So no call leaves
the relay that names a field the target lacks. Field lists come from
``GET database/{id}/fields`` (and ``GET database/{id}/collections``), are
cached in Redis for RELAY_SCHEMA_TTL and fetched anew when a check fails, so
a field added in Copernica a minute ago is not refused. Names compare
case-insensitively, as Copernica compares them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from worker.copernica import PAGE_LIMIT, Answer, ApiV1, Call

#: Sends one call and returns Copernica's answer (the client's send, or the
#: worker's, which also keeps to the shared limits).
Send = Callable[[Call], Answer]

SCHEMA_PREFIX = "relay:schema:"

#: Field-list pages read at most (a thousand fields each).
MAX_FIELD_PAGES = 20

#: Filter names Copernica understands on every database without a field.
SPECIAL_SELECTOR_FIELDS = frozenset({"id", "code"})


class SchemaUnavailable(Exception):
    """Copernica would not list the fields; the answer says why."""

    def __init__(self, answer: Answer | None, what: str):
        self.answer = answer
        detail = f"{answer.status}: {answer.message}" if answer else "no answer"
        super().__init__(f"could not list the fields of {what} ({detail})")


@dataclass(frozen=True)
class Schema:
    fields: frozenset[str]  # lower-cased
    collections: Mapping[str, frozenset[str]]  # name and id, lower-cased -> fields

    def missing(self, names: Iterable[str], selector: bool = False) -> list[str]:
        allowed = self.fields | (SPECIAL_SELECTOR_FIELDS if selector else frozenset())
        return [name for name in names if name.lower() not in allowed]

    def missing_in_collection(
        self, collection: str, names: Iterable[str], selector: bool = False
    ) -> list[str] | None:
        """Names the collection lacks, or None when there is no such collection."""
        fields = self.collections.get(collection.lower())
        if fields is None:
            return None
        allowed = fields | (SPECIAL_SELECTOR_FIELDS if selector else frozenset())
        return [name for name in names if name.lower() not in allowed]

    def to_json(self) -> str:
        return json.dumps(
            {
                "fields": sorted(self.fields),
                "collections": {k: sorted(v) for k, v in self.collections.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Schema:
        data = json.loads(text)
        return cls(
            fields=frozenset(data["fields"]),
            collections={k: frozenset(v) for k, v in data["collections"].items()},
        )


def fetch_schema(send: Send, api: ApiV1, database: str) -> Schema:
    """Ask Copernica; raises SchemaUnavailable (or what ``send`` raises)."""
    fields = _names(_all_pages(send, api, database), f"database {database}")
    answer = send(api.collections_get(database))
    if not answer.ok:
        raise SchemaUnavailable(answer, f"the collections of database {database}")
    collections = {}
    for item in _page_data(answer.data):
        names = frozenset(
            str(f.get("name", "")).lower() for f in _page_data(item.get("fields"))
        )
        for handle in (item.get("name"), item.get("ID")):
            if handle is not None:
                collections[str(handle).lower()] = names
    return Schema(fields=fields, collections=collections)


def _all_pages(send: Send, api: ApiV1, database: str) -> list[dict]:
    items: list[dict] = []
    while True:
        answer = send(api.fields_get(database, start=len(items)))
        if not answer.ok:
            raise SchemaUnavailable(answer, f"database {database}")
        page = _page_data(answer.data)
        items.extend(page)
        total = answer.data.get("total") if isinstance(answer.data, dict) else None
        if len(page) < PAGE_LIMIT or (isinstance(total, int) and len(items) >= total):
            return items
        if len(items) >= MAX_FIELD_PAGES * PAGE_LIMIT:
            # A database has a few hundred fields; an answer that keeps
            # going is broken, and would keep this loop going forever.
            raise SchemaUnavailable(None, f"database {database} (endless field list)")


def _page_data(data) -> list[dict]:
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return [item for item in data["data"] if isinstance(item, dict)]
    return []


def _names(items: list[dict], what: str) -> frozenset[str]:
    return frozenset(str(item.get("name", "")).lower() for item in items)


class SchemaCache:
    """Field lists per database, shared by all workers through Redis."""

    def __init__(
        self, connection, send: Send, api: ApiV1, ttl_seconds: int, account: str = ""
    ):
        self.connection = connection
        self.send = send
        self.api = api
        self.ttl = ttl_seconds
        # Another base URL or token may be another account with other
        # databases under the same ids: its field lists are kept apart.
        self.scope = hashlib.sha256(account.encode()).hexdigest()[:12]

    def _key(self, database: str) -> str:
        return f"{SCHEMA_PREFIX}{self.scope}:{database.lower()}"

    def key(self, database: str) -> str:
        """The Redis key of the database's cached field list, for a caller
        that reads it along with other keys (see ``get``'s ``cached``)."""
        return self._key(database)

    def get(
        self, database: str, fresh: bool = False, cached: bytes | None = None
    ) -> Schema:
        """The field list: ``cached`` (the key's value, already read by the
        caller) or the cached one, else Copernica's, which is then cached."""
        key = self._key(database)
        if not fresh:
            if cached is None:
                cached = self.connection.get(key)
            if cached:
                return Schema.from_json(cached)
        schema = fetch_schema(self.send, self.api, database)
        self.connection.set(key, schema.to_json(), ex=self.ttl)
        return schema

    def forget(self, database: str) -> None:
        self.connection.delete(self._key(database))


def rule_problems(rule, schema: Schema) -> list[str]:
    """Every field a mapping rule names that the database lacks (for check)."""
    problems = [
        f"key field {name!r} is not a field of the database"
        for name in schema.missing(rule.key, selector=True)
    ]
    problems += [
        f"field {name!r} is not a field of the database"
        for name in schema.missing(sorted(set(rule.fields) - set(rule.key)))
    ]
    collection = rule.collection
    if collection is not None:
        names = sorted(set(collection.fields) | set(collection.key))
        missing = schema.missing_in_collection(collection.name, names)
        if missing is None:
            problems.append(f"the database has no collection {collection.name!r}")
        for name in missing or ():
            problems.append(
                f"field {name!r} is not a field of collection {collection.name!r}"
            )
    return problems


def privacy_problems(privacy, schema: Schema) -> list[str]:
    problems = [
        f"match field {name!r} is not a field of the database"
        for name in schema.missing(privacy.match, selector=True)
    ]
    problems += [
        f"clear field {name!r} is not a field of the database"
        for name in schema.missing(privacy.clear)
    ]
    return problems
