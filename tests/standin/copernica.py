"""A loopback stand-in for Copernica's REST API (v1 to v4) and its JWT endpoint.

The relay's worker runs in its own process and talks to this server over real
HTTP, so tests exercise the same URL building, percent-encoding, status handling,
redirect policy and retries that production uses against ``api.copernica.com``.
The behaviour follows the research brief in ``/work/shared/docs/copernica-api.md``.
Where the brief reports something observed on the live API, the stand-in copies
the observation, including the parts that are dangerous for a client:

* ``fields[]`` filters that name an unknown field, or that have no recognisable
  operator, are dropped without an error. A PUT whose filters are all dropped
  therefore updates every profile in the database. Each dropped expression is
  appended to ``ignored_filters`` so a test can assert the relay never sends one.
* Unknown fields in a PUT body are ignored without an error (2020 behaviour).
  A v1 client sending a v2+ body (``{"fields": {...}}``) thus changes nothing,
  or creates an empty profile when ``create=1``.
* Query strings are decoded like a PHP server decodes them: a raw ``+`` becomes a
  space, so ``email==a+b@example.com`` selects ``"a b@example.com"``.
* A bad v1-v3 access token is answered with 400, not 401.
* v1/v2 answer a successful PUT with ``303 See Other`` (or 200, see
  ``put_status``). The ``Location`` header echoes the request without its
  ``/vN`` prefix, access token included. Paths without a version are served as
  v1, as observed, so a client that follows the 303 sends a GET that gets an
  ordinary 200 answer.
* The server finishes what it started: when a slow answer (``Fault.delay``)
  outlives the client's timeout, the update is applied anyway.
* ``PUT profile/$id/subprofiles/$collection`` sends no ``X-Created`` when it
  creates a subprofile (observed in 2020 and reported as a bug).
* ``PUT profile/$id/fields`` takes a flat field map in every version and answers
  like any other PUT that creates nothing: ``put_status`` on v1/v2, 204 on v3/v4.
* Overload is answered 503 with the load balancer's HTML page, never with JSON
  (see ``overload_above_rps`` and ``overload_above_concurrency``).

Choices made where the brief says the real behaviour is unknown:

* v4 with a missing, unknown or expired bearer JWT answers 401 with the usual
  ``{"error": {"message": "Invalid access token"}}`` body. A v4 URL carrying
  ``access_token`` answers 400.
* The JWT endpoint (``POST /authenticate``, or ``GET /authenticate?access_token=``)
  answers the bare token as ``text/plain``.
* ``==``, ``!=``, ``<>`` and the LIKE operators compare case-sensitively.
  ``<``, ``>``, ``<=`` and ``>=`` compare numerically when both sides are
  numbers, and as strings otherwise.
* A filter is split at the first operator character: the field name is the text
  before it, the operator is the two-character operator starting there if there
  is one, else ``<`` or ``>``. Anything else (``=``, ``=>``, ``<<``...) means no
  recognisable operator. The value is the rest, operator characters included.
* ``async=1`` applies the change before answering and still sends ``X-Created``.
* Request bodies must be JSON. The real API also accepts form-encoded bodies;
  the relay never sends them, so the stand-in answers 400 "Invalid data
  provided" to catch a client that does by accident.
* Profile and field IDs are JSON numbers, and every profile carries every
  database field (unset ones as ``""``), as a GET on the live API shows them.
  Collection fields are numbered after all database fields, so a field ID never
  names two fields. A collection ID alone finds the collection in any database.
* ``GET database/$id/collections`` embeds each collection's fields as the first
  page (``start`` 0, default ``limit``) that ``GET collection/$cid/fields`` gives.
* ``GET profile/$id/subprofiles/$collection`` accepts ``fields[]`` filters like
  the other list calls, unknown names dropped the same way.
* ``strict_fields=True`` switches unknown body fields from ignored to a 400
  ``Unknown field: <name>`` (``UNKNOWN_FIELD_MESSAGE``), naming the first one in
  body order, with nothing applied. The brief (5.3) reads an Aug 2021 product
  update as such an error for updates that can touch several records, so it
  covers ``PUT database/$id/profiles`` and ``PUT profile/$id/subprofiles/...``
  only; ``PUT profile/$id/fields`` and the POST calls stay lenient, and so do
  filters in both modes. The default (False) is the 2020 behaviour.
* Load is measured from the moment a request's body has been read until just
  before its answer is written (or the connection is closed). Ending the count
  before the write means a client that waits for each answer never appears to
  overlap itself, whatever the thread scheduling.
* The overload rules ignore the JWT endpoint, which in production lives on
  another host: ``/authenticate`` neither counts towards them nor gets a 503.
  Requests that were refused with 503 do count, as load on a real balancer does,
  so a client that retries without backing off stays refused. The request rate
  is judged over the recorded requests only, so ``clear()`` forgets it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, unquote_plus

FIRST_PROFILE_ID = 1001
FIRST_SUBPROFILE_ID = 500001
DEFAULT_JWT_LIFETIME = 86400
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

# Text of the 400 that strict_fields gives for a body field the target lacks.
UNKNOWN_FIELD_MESSAGE = "Unknown field: {name}"

# The span over which overload_above_rps counts arrivals.
RATE_WINDOW_SECONDS = 1.0

# A hanging request must end by itself even when a test forgets to stop the
# stand-in, so "forever" is capped.
MAX_HANG_SECONDS = 300.0

# The name is everything before the first operator character; two-character
# operators are tried before the one-character ones.
_FILTER = re.compile(r"([^=<>!~]+)(==|!=|<>|<=|>=|=~|!~|<|>)(.*)", re.DOTALL)
_FIELDS_PARAMETER = re.compile(r"fields(\[[^\]]*\])?")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_VERSION_PREFIX = re.compile(r"/v(\d+)(?=/|$)")

# PHP's trim() strips exactly these, and the live API appears to use it.
_PHP_WHITESPACE = " \t\n\r\0\x0b"

# Special filter names that work without a database field of that name. A real
# field with the same name wins (observed for "modified").
_SPECIAL_FILTERS = ("id", "code", "modified")

_LOADBALANCER_PAGE = (
    b"<html><head><title>Loadbalancer Error</title></head><body>"
    b"<h1>Loadbalancer Error</h1>"
    b"<p>The server has too many requests to handle. Try again later.</p>"
    b"</body></html>"
)


@dataclass(frozen=True)
class Recorded:
    """One request as the stand-in received it, plus the status it answered.

    ``status`` is None while the request is still being answered, and stays None
    when no HTTP answer was sent (a ``drop`` fault, or a hang ended by ``stop``).
    """

    method: str
    path: str
    raw_query: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    json: Any
    status: int | None
    received_at: float

    def query_values(self, name: str) -> list[str]:
        """All decoded values of query parameter ``name``, in request order."""
        return [value for key, value in self.query if key == name]


@dataclass
class Fault:
    """A scripted answer that replaces (or slows down) the normal one.

    ``status=None`` means the normal answer, which is only interesting together
    with ``delay`` or ``hang``, or as a pass-through slot in the fault queue.
    """

    status: int | None = 503
    body: bytes | str | dict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0
    hang: bool = False
    drop: bool = False
    times: int = 1
    method: str | None = None
    path_contains: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.times < 1:
            raise ValueError("Fault.times must be at least 1")

        if self.delay < 0:
            raise ValueError("Fault.delay cannot be negative")


class _ApiError(Exception):
    """An error the API reports in its usual ``{"error": {"message": ...}}`` body."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class _Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class _Entry:
    """Bookkeeping for one recorded request while it is being answered.

    Entries compare by identity so the set of requests in flight can hold them.
    """

    record: Recorded
    raw_path: str

    # Settled means the test may look at it: answered, dropped, or held by a
    # hang fault that will not finish before someone releases it.
    settled: bool = False

    # Decided on arrival: the load balancer refuses before the API sees it.
    overloaded: bool = False


@dataclass
class _FaultSlot:
    fault: Fault
    remaining: int


@dataclass
class _Collection:
    id: int
    name: str
    fields: list[str]
    field_ids: dict[str, int] = field(default_factory=dict)


class CopernicaStandIn:
    """Copernica's REST API on 127.0.0.1, with scripted faults and full recording.

    ``databases`` maps a database ID to its field names; ``database_names`` lets
    paths use names instead of IDs (matched case-insensitively). ``collections``
    maps a database ID to ``{collection name: field names}``. ``put_status`` is
    the v1/v2 success status of a PUT: 200, or 303 with an echoing ``Location``.

    ``strict_fields`` makes multi-record PUTs reject unknown body fields with a
    400. ``overload_above_rps`` answers 503 to a request that arrives when more
    than that many arrived in the last second; ``overload_above_concurrency``
    answers 503 to one that arrives while that many are already in flight.
    """

    def __init__(
        self,
        access_token: str = "standin-token",
        databases: dict[int, list[str]] | None = None,
        database_names: dict[str, int] | None = None,
        put_status: int = 303,
        collections: dict[int, dict[str, list[str]]] | None = None,
        jwt_lifetime: float = DEFAULT_JWT_LIFETIME,
        upsert_window: float = 0.0,
        strict_fields: bool = False,
        overload_above_rps: float | None = None,
        overload_above_concurrency: int | None = None,
    ) -> None:
        if put_status not in (200, 303):
            raise ValueError("put_status must be 200 or 303")

        if overload_above_rps is not None and overload_above_rps < 0:
            raise ValueError("overload_above_rps cannot be negative")

        if overload_above_concurrency is not None and overload_above_concurrency < 1:
            raise ValueError("overload_above_concurrency must be at least 1")

        self.access_token = access_token
        self.put_status = put_status
        self.jwt_lifetime = jwt_lifetime
        # Seconds between finding the matches of a PUT database profiles and
        # writing (or creating) them. The brief infers that Copernica's upsert
        # is not atomic; a window > 0 lets two concurrent create=1 PUTs for
        # one new key both create a profile, as the real API may.
        self.upsert_window = upsert_window
        self.strict_fields = strict_fields
        self.overload_above_rps = overload_above_rps
        self.overload_above_concurrency = overload_above_concurrency

        self._database_fields = {
            int(database): list(names) for database, names in (databases or {}).items()
        }
        self._database_names = {}
        for name, database in (database_names or {}).items():
            if database not in self._database_fields:
                raise ValueError(f"database name {name!r} points at unknown {database}")
            self._database_names[name.lower()] = database

        # Field and collection IDs only need to be stable and distinct, so they
        # are numbered in the order the constructor received them.
        self._field_ids = {}
        next_field_id = 1
        for database, names in self._database_fields.items():
            for name in names:
                self._field_ids[(database, name)] = next_field_id
                next_field_id += 1

        self._collections: dict[int, list[_Collection]] = {}
        next_id = 1
        for database, by_name in (collections or {}).items():
            if database not in self._database_fields:
                raise ValueError(f"collections given for unknown database {database}")
            self._collections[database] = []
            for name, names in by_name.items():
                collection = _Collection(next_id, name, list(names))
                for field_name in collection.fields:
                    collection.field_ids[field_name] = next_field_id
                    next_field_id += 1
                self._collections[database].append(collection)
                next_id += 1

        self._jwt_key = os.urandom(32)
        self._jwts: dict[str, float] = {}
        self._tokens_issued = 0

        self._cond = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._stopping = False
        self._release_generation = 0
        # Requests between arrival and answer. Not part of _reset_state: the
        # requests in flight during clear() still finish afterwards.
        self._in_flight: set[_Entry] = set()
        self.errors: list[BaseException] = []
        self._reset_state()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Serve on a free loopback port and return the base URL."""
        if self._server is not None:
            return self.base_url

        self._stopping = False
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="copernica-standin",
            daemon=True,
        )
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        """Stop serving; held and hanging requests are closed without an answer."""
        server = self._server
        if server is None:
            return

        with self._cond:
            self._stopping = True
            self._cond.notify_all()

        server.shutdown()

        # Idle keep-alive connections would otherwise keep being served by their
        # handler threads after the listening socket is gone.
        with self._cond:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

        with self._cond:
            self._cond.wait_for(lambda: not self._connections, timeout=2)

        self._server = None
        self._thread = None

    def __enter__(self) -> CopernicaStandIn:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the stand-in is not running; call start() first")

        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------ test interface

    @property
    def requests(self) -> list[Recorded]:
        with self._cond:
            return [entry.record for entry in self._entries]

    @property
    def ignored_filters(self) -> list[str]:
        """Every ``fields[]`` expression dropped so far, as received (decoded)."""
        with self._cond:
            return list(self._ignored_filters)

    @property
    def tokens_issued(self) -> int:
        with self._cond:
            return self._tokens_issued

    @property
    def faults(self) -> list[Fault]:
        """Faults still queued, first to be consumed first."""
        with self._cond:
            return [slot.fault for slot in self._faults]

    def requests_to(
        self, path_fragment: str, method: str | None = None
    ) -> list[Recorded]:
        """Recorded requests whose decoded path contains ``path_fragment``.

        ``method`` narrows them to one HTTP method, in any letter case.
        """
        wanted = method.upper() if method is not None else None
        return [
            record
            for record in self.requests
            if path_fragment in record.path
            and (wanted is None or record.method == wanted)
        ]

    def arrival_times(self) -> list[float]:
        """``received_at`` of every recorded request, in arrival order."""
        with self._cond:
            return [entry.record.received_at for entry in self._entries]

    @property
    def peak_concurrency(self) -> int:
        """Most requests in flight at once since start, or since ``clear()``.

        A request is in flight from arrival until its answer is about to be
        written, so delayed and hanging requests count for as long as they wait.
        """
        with self._cond:
            return self._peak_concurrency

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[Recorded]:
        """Block until ``n`` requests were answered (or are held by a hang fault).

        Waiting for answered requests rather than arrived ones means the returned
        records already carry the status that was sent.
        """
        with self._cond:
            reached = self._cond.wait_for(
                lambda: sum(entry.settled for entry in self._entries) >= n, timeout
            )
            records = [entry.record for entry in self._entries]

        if not reached:
            raise AssertionError(_describe_shortfall(n, timeout, records))

        return records

    def add_fault(self, fault: Fault) -> None:
        with self._cond:
            self._faults.append(_FaultSlot(fault, fault.times))

    def release(self) -> None:
        """Let every hanging request go: each gets its fault's answer.

        A hang fault with ``status=None`` gets the normal answer instead.
        """
        with self._cond:
            self._release_generation += 1
            self._cond.notify_all()

    def expire_tokens(self) -> None:
        """Make every JWT issued so far expired, as if 24 hours had passed."""
        with self._cond:
            for token in self._jwts:
                self._jwts[token] = 0.0

    def clear(self) -> None:
        """Forget recorded requests, profiles, subprofiles and queued faults.

        Issued JWTs stay valid, like they would on the real service. The peak
        concurrency starts again from the number of requests in flight now
        (0 when the stand-in is idle).
        """
        with self._cond:
            self._reset_state()

    def profiles(self, database: int | str) -> list[dict]:
        """Current profiles of a database (ID or name) as ``{"id", "fields"}``."""
        database_id = self._known_database(database)
        with self._cond:
            stored = self._profiles[database_id].values()
            return [
                {"id": profile["id"], "fields": dict(profile["fields"])}
                for profile in sorted(stored, key=lambda profile: profile["id"])
            ]

    def add_profile(self, database: int | str, fields: dict[str, Any]) -> int:
        """Seed a profile and return its ID. Unknown field names raise ValueError."""
        database_id = self._known_database(database)
        field_names = self._database_fields[database_id]

        # The API would drop unknown fields; in a test's own setup that is a typo
        # worth failing on.
        known = {name.lower() for name in field_names}
        unknown = sorted(name for name in fields if str(name).lower() not in known)
        if unknown:
            raise ValueError(f"not fields of database {database_id}: {unknown}")

        with self._cond:
            return self._create_profile(
                database_id, _resolve_field_names(fields, field_names)
            )

    def subprofiles(self, profile_id: int, collection: int | str) -> list[dict]:
        """Current subprofiles of one profile in one collection (ID or name)."""
        with self._cond:
            database_id = self._database_of_profile(profile_id)
            if database_id is None:
                raise KeyError(f"no profile {profile_id}")

            found = self._find_collection(database_id, str(collection))
            if found is None:
                raise KeyError(f"no collection {collection!r} in {database_id}")

            stored = self._subprofiles.get((profile_id, found.id), {}).values()
            return [
                {"id": subprofile["id"], "fields": dict(subprofile["fields"])}
                for subprofile in sorted(stored, key=lambda item: item["id"])
            ]

    # ------------------------------------------------------------ request intake

    def _record_arrival(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> _Entry:
        raw_path, _, raw_query = target.partition("?")
        merged: dict[str, str] = {}
        for name, value in headers:
            name = name.lower()
            merged[name] = f"{merged[name]}, {value}" if name in merged else value

        path = unquote(raw_path, errors="replace")
        query = _parse_query(raw_query)
        parsed = _parse_json(body)
        with self._cond:
            # Taking the time under the lock keeps _entries in arrival order,
            # which lets the rate check stop at the first entry that is too old.
            record = Recorded(
                method=method,
                path=path,
                raw_query=raw_query,
                query=query,
                headers=merged,
                body=body,
                json=parsed,
                status=None,
                received_at=time.monotonic(),
            )
            entry = _Entry(record, raw_path)
            entry.overloaded = self._is_overloaded(record)
            self._entries.append(entry)
            self._in_flight.add(entry)
            self._peak_concurrency = max(self._peak_concurrency, len(self._in_flight))
            self._cond.notify_all()

        return entry

    def _is_overloaded(self, record: Recorded) -> bool:
        # Caller holds the lock; ``record`` is not yet among the entries.
        if _is_authenticate(record.path):
            return False

        limit = self.overload_above_concurrency
        if limit is not None:
            busy = sum(
                not _is_authenticate(entry.record.path) for entry in self._in_flight
            )
            if busy >= limit:
                return True

        rate = self.overload_above_rps
        if rate is None:
            return False

        window_start = record.received_at - RATE_WINDOW_SECONDS
        recent = 0
        for entry in reversed(self._entries):
            if entry.record.received_at <= window_start:
                break
            if not _is_authenticate(entry.record.path):
                recent += 1

        return recent > rate

    def _record_departure(self, entry: _Entry) -> None:
        with self._cond:
            self._in_flight.discard(entry)

    def _respond(self, entry: _Entry) -> _Answer | None:
        """Decide the answer for a recorded request; None means close silently."""
        with self._cond:
            if self._stopping:
                return self._settle(entry, None)

            # Refused by the load balancer, so no fault is used up.
            if entry.overloaded:
                return self._settle(entry, _fault_answer(Fault(503)))

            fault = self._take_fault(entry.record)
            generation = self._release_generation

        if fault is None:
            return self._settle(entry, self._answer_normally(entry))

        if fault.drop:
            return self._settle(entry, None)

        if fault.hang:
            if not self._hold(entry, generation):
                return self._settle(entry, None)
        elif fault.delay > 0:
            if not self._pause(fault.delay):
                return self._settle(entry, None)

        if fault.status is None:
            return self._settle(entry, self._answer_normally(entry))

        return self._settle(entry, _fault_answer(fault))

    def _take_fault(self, record: Recorded) -> Fault | None:
        # Caller holds the lock. The first queued fault that matches is used,
        # so faults aimed at different paths can be queued side by side.
        for slot in self._faults:
            fault = slot.fault
            if fault.method is not None and fault.method.upper() != record.method:
                continue

            wanted_path = fault.path_contains
            if wanted_path is not None and wanted_path not in record.path:
                continue

            slot.remaining -= 1
            if slot.remaining == 0:
                self._faults.remove(slot)

            return fault

        return None

    def _hold(self, entry: _Entry, generation: int) -> bool:
        """Wait for release() or stop(); True when released."""
        with self._cond:
            entry.settled = True
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: self._stopping or self._release_generation != generation,
                MAX_HANG_SECONDS,
            )
            released = self._release_generation != generation
            return released and not self._stopping

    def _pause(self, seconds: float) -> bool:
        """Sleep, but wake up for stop(); True when the full delay passed."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopping, seconds)
            return not self._stopping

    def _settle(self, entry: _Entry, answer: _Answer | None) -> _Answer | None:
        with self._cond:
            status = answer.status if answer is not None else None
            entry.record = replace(entry.record, status=status)
            entry.settled = True
            self._cond.notify_all()

        return answer

    # ----------------------------------------------------------------- routing

    def _answer_normally(self, entry: _Entry) -> _Answer:
        try:
            return self._route(entry)
        except _ApiError as error:
            return _error_answer(error.message, error.status)
        except Exception as error:  # a bug in the stand-in, not in the client
            with self._cond:
                self.errors.append(error)
            return _error_answer(f"stand-in internal error: {error!r}", 500)

    def _route(self, entry: _Entry) -> _Answer:
        record = entry.record
        if _is_authenticate(record.path):
            return self._authenticate(record)

        # Unversioned paths were observed to behave like v1.
        version_match = _VERSION_PREFIX.match(record.path)
        version = int(version_match[1]) if version_match else 1
        rest = record.path[version_match.end() :] if version_match else record.path
        if version not in (1, 2, 3, 4):
            raise _ApiError("Invalid method")

        self._check_credentials(record, version)

        parts = rest.strip("/").split("/")
        resource = parts[0].lower()
        method = record.method
        if resource == "database" and len(parts) == 3:
            database_id = self._database_from_path(parts[1])
            action = parts[2].lower()
            if action == "profiles" and method == "PUT":
                return self._put_database_profiles(entry, version, database_id)

            if action == "profiles" and method == "GET":
                return self._get_database_profiles(record, database_id)

            if action == "profiles" and method == "POST":
                return self._post_database_profiles(record, version, database_id)

            if action == "fields" and method == "GET":
                return self._get_database_fields(record, database_id)

            if action == "collections" and method == "GET":
                return self._get_database_collections(record, database_id)

        if resource == "collection" and len(parts) == 3 and method == "GET":
            if parts[2].lower() == "fields":
                return self._get_collection_fields(record, parts[1])

        if resource == "profile" and len(parts) == 3 and method == "PUT":
            if parts[2].lower() == "fields":
                return self._put_profile_fields(entry, version, parts[1])

        if resource == "profile" and len(parts) == 4 and method == "PUT":
            if parts[2].lower() == "subprofiles":
                return self._put_profile_subprofiles(entry, version, parts[1], parts[3])

        if resource == "profile" and len(parts) == 4 and method == "GET":
            if parts[2].lower() == "subprofiles":
                return self._get_profile_subprofiles(record, parts[1], parts[3])

        if resource == "profile" and len(parts) == 2 and method == "DELETE":
            return self._delete_profile(version, parts[1])

        raise _ApiError("Invalid method")

    def _check_credentials(self, record: Recorded, version: int) -> None:
        url_tokens = record.query_values("access_token")
        if version < 4:
            # PHP keeps the last of repeated parameters.
            if not url_tokens or url_tokens[-1] != self.access_token:
                raise _ApiError("Invalid access token")
            return

        if url_tokens:
            raise _ApiError("Access tokens are not accepted in the URL in REST v4")

        scheme, _, token = record.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            raise _ApiError("Invalid access token", status=401)

        with self._cond:
            expires = self._jwts.get(token.strip())

        if expires is None or expires <= time.time():
            raise _ApiError("Invalid access token", status=401)

    def _authenticate(self, record: Recorded) -> _Answer:
        if record.method == "POST":
            offered = _parse_query(record.body.decode("latin-1"))
        else:
            offered = record.query
        tokens = [value for name, value in offered if name == "access_token"]
        if not tokens or tokens[-1] != self.access_token:
            raise _ApiError("Invalid access token")

        issued_at = time.time()
        expires = issued_at + self.jwt_lifetime
        with self._cond:
            self._tokens_issued += 1
            serial = self._tokens_issued

        header = {"alg": "HS256", "typ": "JWT"}
        payload = {
            "iss": "copernica-standin",
            "iat": int(issued_at),
            "exp": int(expires),
            "jti": serial,
        }
        signing_input = f"{_b64url_json(header)}.{_b64url_json(payload)}"
        signature = hmac.new(self._jwt_key, signing_input.encode(), hashlib.sha256)
        token = f"{signing_input}.{_b64url(signature.digest())}"
        with self._cond:
            self._jwts[token] = expires

        headers = {"Content-Type": "text/plain; charset=utf-8"}
        return _Answer(200, token.encode(), headers)

    # ------------------------------------------------------- database profiles

    def _put_database_profiles(
        self, entry: _Entry, version: int, database_id: int
    ) -> _Answer:
        record = entry.record
        expressions = _filter_expressions(record.query)
        if expressions is None:
            raise _ApiError("URL parameter fields is required")

        values = _body_fields(record, flat=version == 1)
        field_names = self._database_fields[database_id]
        if self.strict_fields:
            _reject_unknown_fields(values, field_names)
        updates = _resolve_field_names(values, field_names)
        create = _is_true(_last(record, "create"))

        with self._cond:
            filters = self._parse_filters(expressions, field_names)
            profiles = self._profiles[database_id].values()
            matches = [item for item in profiles if _matches_all(item, filters)]

        if self.upsert_window > 0:
            time.sleep(self.upsert_window)

        with self._cond:
            for profile in matches:
                profile["fields"].update(updates)
                profile["modified"] = _now()

            created = None
            if not matches and create:
                # Only the body becomes the new profile; filter values are not
                # copied, so a body without the key field creates an orphan.
                created = self._create_profile(database_id, updates)

        return self._put_success(entry, version, created, send_created=True)

    def _get_database_profiles(self, record: Recorded, database_id: int) -> _Answer:
        expressions = _filter_expressions(record.query) or []
        with self._cond:
            field_names = self._database_fields[database_id]
            filters = self._parse_filters(expressions, field_names)
            profiles = sorted(
                self._profiles[database_id].values(), key=lambda profile: profile["id"]
            )
            matches = [item for item in profiles if _matches_all(item, filters)]
            items = [
                {
                    "ID": profile["id"],
                    "fields": dict(profile["fields"]),
                    "interests": [],
                    "database": database_id,
                    "secret": profile["secret"],
                    "created": profile["created"],
                    "modified": profile["modified"],
                    "removed": False,
                }
                for profile in matches
            ]

        return _json_answer(_page(record, items))

    def _post_database_profiles(
        self, record: Recorded, version: int, database_id: int
    ) -> _Answer:
        values = _body_fields(record, flat=version == 1)
        updates = _resolve_field_names(values, self._database_fields[database_id])
        with self._cond:
            created = self._create_profile(database_id, updates)

        return _Answer(201, b"", {"X-Created": str(created)})

    def _get_database_fields(self, record: Recorded, database_id: int) -> _Answer:
        items = [
            _field_item(self._field_ids[(database_id, name)], name)
            for name in self._database_fields[database_id]
        ]
        return _json_answer(_page(record, items))

    def _get_database_collections(self, record: Recorded, database_id: int) -> _Answer:
        items = [
            {
                "ID": collection.id,
                "name": collection.name,
                "database": database_id,
                "fields": _page_slice(_collection_field_items(collection)),
            }
            for collection in self._collections.get(database_id, [])
        ]
        return _json_answer(_page(record, items))

    # ------------------------------------------------------------- collections

    def _get_collection_fields(self, record: Recorded, collection_ref: str) -> _Answer:
        collection = self._collection_by_id(collection_ref)
        if collection is None:
            raise _ApiError("No collection with given ID")

        return _json_answer(_page(record, _collection_field_items(collection)))

    # ------------------------------------------------- profiles and subprofiles

    def _put_profile_subprofiles(
        self, entry: _Entry, version: int, profile_ref: str, collection_ref: str
    ) -> _Answer:
        record = entry.record
        with self._cond:
            profile_id = int(profile_ref) if profile_ref.isdigit() else None
            database_id = self._database_of_profile(profile_id)
        if database_id is None:
            raise _ApiError("No entity with supplied ID")

        collection = self._find_collection(database_id, collection_ref)
        if collection is None:
            raise _ApiError("No collection with given ID")

        expressions = _filter_expressions(record.query)
        if expressions is None:
            raise _ApiError("URL parameter fields is required")

        # The body is a flat field map in every API version.
        values = _body_fields(record, flat=True)
        if self.strict_fields:
            _reject_unknown_fields(values, collection.fields)
        updates = _resolve_field_names(values, collection.fields)
        create = _is_true(_last(record, "create"))

        with self._cond:
            filters = self._parse_filters(expressions, collection.fields)
            stored = self._subprofiles.setdefault((profile_id, collection.id), {})
            matches = [item for item in stored.values() if _matches_all(item, filters)]
            for subprofile in matches:
                subprofile["fields"].update(updates)
                subprofile["modified"] = _now()

            created = None
            if not matches and create:
                created = self._next_subprofile_id
                self._next_subprofile_id += 1
                stored[created] = _new_record(created, collection.fields, updates)

        return self._put_success(entry, version, created, send_created=False)

    def _get_profile_subprofiles(
        self, record: Recorded, profile_ref: str, collection_ref: str
    ) -> _Answer:
        profile_id = int(profile_ref) if profile_ref.isdigit() else None
        expressions = _filter_expressions(record.query) or []
        with self._cond:
            database_id = self._database_of_profile(profile_id)
            if database_id is None:
                raise _ApiError("No entity with supplied ID")

            collection = self._find_collection(database_id, collection_ref)
            if collection is None:
                raise _ApiError("No collection with given ID")

            filters = self._parse_filters(expressions, collection.fields)
            stored = self._subprofiles.get((profile_id, collection.id), {})
            items = [
                {
                    "ID": subprofile["id"],
                    "secret": subprofile["secret"],
                    "fields": dict(subprofile["fields"]),
                    "profile": profile_id,
                    "collection": collection.id,
                    "created": subprofile["created"],
                    "modified": subprofile["modified"],
                    "removed": False,
                }
                for subprofile in sorted(stored.values(), key=lambda item: item["id"])
                if _matches_all(subprofile, filters)
            ]

        return _json_answer(_page(record, items))

    def _put_profile_fields(
        self, entry: _Entry, version: int, profile_ref: str
    ) -> _Answer:
        profile_id = int(profile_ref) if profile_ref.isdigit() else None
        with self._cond:
            database_id = self._database_of_profile(profile_id)
        if database_id is None:
            raise _ApiError("No entity with supplied ID")

        # Flat in every version, unlike PUT profile/$id and the database calls.
        values = _body_fields(entry.record, flat=True)
        updates = _resolve_field_names(values, self._database_fields[database_id])
        with self._cond:
            # A DELETE may have won the race since the lookup above.
            profile = self._profiles[database_id].get(profile_id)
            if profile is None:
                raise _ApiError("No entity with supplied ID")

            profile["fields"].update(updates)
            profile["modified"] = _now()

        return self._put_success(entry, version, None, send_created=False)

    def _delete_profile(self, version: int, profile_ref: str) -> _Answer:
        profile_id = int(profile_ref) if profile_ref.isdigit() else None
        with self._cond:
            if profile_id in self._removed_profiles:
                raise _ApiError("This profile has already been removed")

            database_id = self._database_of_profile(profile_id)
            if database_id is None:
                raise _ApiError("No entity with supplied ID")

            del self._profiles[database_id][profile_id]
            self._removed_profiles.add(profile_id)
            for key in [key for key in self._subprofiles if key[0] == profile_id]:
                del self._subprofiles[key]

        if version >= 3:
            return _Answer(204, b"", {"X-deleted": f"profile {profile_id}"})

        return _Answer(200)

    def _put_success(
        self, entry: _Entry, version: int, created: int | None, send_created: bool
    ) -> _Answer:
        headers = {}
        if created is not None and send_created:
            headers["X-Created"] = str(created)

        if version >= 3:
            return _Answer(201 if created is not None else 204, b"", headers)

        if self.put_status == 303:
            # The live API echoes the request, token included; that is why a
            # client must neither follow nor log this header.
            prefix = _VERSION_PREFIX.match(entry.raw_path)
            path = entry.raw_path[prefix.end() :] if prefix else entry.raw_path
            query = entry.record.raw_query
            headers["Location"] = f"{path}?{query}" if query else path

        return _Answer(self.put_status, b"", headers)

    # ------------------------------------------------------------- state helpers

    def _reset_state(self) -> None:
        # Caller holds the lock, or is the constructor.
        self._entries: list[_Entry] = []
        self._faults: list[_FaultSlot] = []
        self._ignored_filters: list[str] = []
        self._profiles: dict[int, dict[int, dict]] = {
            database: {} for database in self._database_fields
        }
        self._subprofiles: dict[tuple[int, int], dict[int, dict]] = {}
        self._removed_profiles: set[int] = set()
        self._next_profile_id = FIRST_PROFILE_ID
        self._next_subprofile_id = FIRST_SUBPROFILE_ID
        self._peak_concurrency = len(self._in_flight)

    def _create_profile(self, database_id: int, values: dict[str, Any]) -> int:
        # Caller holds the lock. Profile IDs are unique across databases, as
        # in Copernica.
        profile_id = self._next_profile_id
        self._next_profile_id += 1
        profile = _new_record(profile_id, self._database_fields[database_id], values)
        self._profiles[database_id][profile_id] = profile
        return profile_id

    def _parse_filters(self, expressions: list[str], field_names: list[str]) -> list:
        # Caller holds the lock.
        by_lower = {name.lower(): name for name in field_names}
        filters = []
        for expression in expressions:
            match = _FILTER.fullmatch(expression.strip(_PHP_WHITESPACE))
            name = match[1].lower() if match else None
            if name in by_lower:
                filters.append((by_lower[name], False, match[2], match[3]))
            elif name in _SPECIAL_FILTERS:
                filters.append((name, True, match[2], match[3]))
            else:
                # The live API drops these without a word; so does the stand-in.
                self._ignored_filters.append(expression)

        return filters

    def _database_from_path(self, reference: str) -> int:
        if reference.isdigit():
            database_id = int(reference)
            if database_id in self._database_fields:
                return database_id
        elif reference.lower() in self._database_names:
            return self._database_names[reference.lower()]

        raise _ApiError("No database with supplied ID")

    def _known_database(self, database: int | str) -> int:
        try:
            return self._database_from_path(str(database))
        except _ApiError:
            raise KeyError(f"no database {database!r}") from None

    def _database_of_profile(self, profile_id: int | None) -> int | None:
        # Caller holds the lock.
        for database_id, profiles in self._profiles.items():
            if profile_id in profiles:
                return database_id

        return None

    def _find_collection(self, database_id: int, reference: str) -> _Collection | None:
        for collection in self._collections.get(database_id, []):
            if reference.isdigit() and int(reference) == collection.id:
                return collection

            if reference.lower() == collection.name.lower():
                return collection

        return None

    def _collection_by_id(self, reference: str) -> _Collection | None:
        # Collection IDs are unique over all databases; names are not, so a
        # path without a database cannot name one.
        if not reference.isdigit():
            return None

        for collections in self._collections.values():
            for collection in collections:
                if collection.id == int(reference):
                    return collection

        return None

    def _track(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.add(connection)

    def _untrack(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.discard(connection)
            self._cond.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, standin: CopernicaStandIn) -> None:
        self.standin = standin
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-request are part of the scenarios under test,
        # so connection errors stay quiet; anything else is a stand-in bug.
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, OSError):
            with self.standin._cond:
                self.standin.errors.append(error)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections open between requests, which lets the
    # relay's HTTP client reuse them as it would against the real API.
    protocol_version = "HTTP/1.1"
    server: _Server

    def version_string(self) -> str:
        return "CopernicaStandIn/1.0"

    def setup(self) -> None:
        super().setup()
        self.server.standin._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.standin._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        standin = self.server.standin
        body = self._read_body()
        entry = standin._record_arrival(
            self.command, self.path, list(self.headers.items()), body
        )
        try:
            answer = standin._respond(entry)
        finally:
            standin._record_departure(entry)

        if answer is None:
            self.close_connection = True
            return

        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)

        # A 204 has no body by definition, so it also carries no length.
        has_body = answer.status not in (204, 304)
        if has_body:
            self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()

        if has_body and answer.body and self.command != "HEAD":
            self.wfile.write(answer.body)

    do_GET = do_PUT = do_POST = do_DELETE = _handle
    do_PATCH = do_HEAD = do_OPTIONS = _handle

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()

        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            return b""

        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked_body(self) -> bytes:
        chunks = []
        while True:
            size_line = self.rfile.readline(65537)
            try:
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
            except ValueError:
                size = 0
            if size == 0:
                # Skip trailers; an empty read means the client went away.
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)

            chunks.append(self.rfile.read(size))
            self.rfile.readline(65537)


# --------------------------------------------------------------------- helpers


def _parse_query(raw_query: str) -> list[tuple[str, str]]:
    """Decode like PHP: ``+`` is a space, names and values are percent-decoded."""
    pairs = []
    for part in raw_query.split("&"):
        if not part:
            continue

        name, _, value = part.partition("=")
        pairs.append((unquote_plus(name), unquote_plus(value)))

    return pairs


def _parse_json(body: bytes) -> Any:
    if not body:
        return None

    try:
        return json.loads(body.decode("utf-8"))
    except ValueError:
        return None


def _filter_expressions(query: list[tuple[str, str]]) -> list[str] | None:
    """The ``fields`` filters in any spelling PHP accepts, or None when absent."""
    found = [value for name, value in query if _FIELDS_PARAMETER.fullmatch(name)]
    return found or None


def _last(record: Recorded, name: str) -> str | None:
    values = record.query_values(name)
    return values[-1] if values else None


def _is_true(value: str | None) -> bool:
    """Copernica's boolean reading: true, yes, or a number at least 1 in size."""
    if value is None:
        return False

    if value.lower() in ("true", "yes"):
        return True

    return bool(_NUMBER.fullmatch(value)) and abs(float(value)) >= 1


def _body_fields(record: Recorded, flat: bool) -> dict:
    """Field values from a PUT/POST body: flat in v1, under "fields" from v2 on."""
    content_type = record.headers.get("content-type", "").split(";")[0]
    if content_type.strip().lower() != "application/json":
        raise _ApiError("Invalid data provided")

    data = record.json
    if not isinstance(data, dict):
        raise _ApiError("Invalid data provided")

    if flat:
        return data

    values = data.get("fields", {})

    # PHP encodes an empty array as [], so an empty list is an empty object.
    if values == []:
        return {}

    if not isinstance(values, dict):
        raise _ApiError("Invalid data provided")

    return values


def _resolve_field_names(values: dict, field_names: list[str]) -> dict[str, Any]:
    """Keep known fields under the database's spelling; drop the rest silently."""
    by_lower = {name.lower(): name for name in field_names}
    return {
        by_lower[str(name).lower()]: value
        for name, value in values.items()
        if str(name).lower() in by_lower
    }


def _reject_unknown_fields(values: dict, field_names: list[str]) -> None:
    """The strict_fields check: a 400 for the first body field the target lacks."""
    known = {name.lower() for name in field_names}
    for name in values:
        if str(name).lower() not in known:
            raise _ApiError(UNKNOWN_FIELD_MESSAGE.format(name=name))


def _new_record(record_id: int, field_names: list[str], values: dict) -> dict:
    now = _now()
    fields = {name: "" for name in field_names}
    fields.update(values)
    return {
        "id": record_id,
        "fields": fields,
        "secret": secrets.token_hex(14),
        "created": now,
        "modified": now,
    }


def _matches_all(record: dict, filters: list) -> bool:
    """AND of all filters; an empty list matches everything, as on the live API."""
    return all(
        _compare(_filter_subject(record, name, special), operator, wanted)
        for name, special, operator, wanted in filters
    )


def _filter_subject(record: dict, name: str, special: bool) -> Any:
    if not special:
        return record["fields"].get(name, "")
    if name == "id":
        return record["id"]
    if name == "code":
        return record["secret"]
    return record["modified"]


def _compare(actual: Any, operator: str, wanted: str) -> bool:
    text = _as_text(actual)
    if operator == "==":
        return text == wanted

    if operator in ("!=", "<>"):
        return text != wanted

    if operator in ("=~", "!~"):
        found = _like_pattern(wanted).fullmatch(text) is not None
        return found if operator == "=~" else not found

    left, right = _as_number(actual), _as_number(wanted)
    if left is None or right is None:
        left, right = text, wanted

    if operator == "<":
        return left < right
    if operator == ">":
        return left > right
    if operator == "<=":
        return left <= right
    return left >= right


def _as_text(value: Any) -> str:
    # The backend stores text, so JSON values are compared the way PHP would
    # turn them into strings.
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    return None


def _like_pattern(pattern: str) -> re.Pattern[str]:
    """SQL LIKE as a regex: % is any run, _ one character, backslash escapes."""
    parts = []
    escaped = False
    for char in pattern:
        if escaped:
            parts.append(re.escape(char))
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "%":
            parts.append(".*")
        elif char == "_":
            parts.append(".")
        else:
            parts.append(re.escape(char))

    return re.compile("".join(parts), re.DOTALL)


def _page(record: Recorded, items: list) -> dict:
    start = _last(record, "start")
    limit = _last(record, "limit")
    start = int(start) if start and start.isdigit() else 0
    limit = min(int(limit), MAX_LIMIT) if limit and limit.isdigit() else DEFAULT_LIMIT
    return _page_slice(items, start, limit)


def _page_slice(items: list, start: int = 0, limit: int = DEFAULT_LIMIT) -> dict:
    """The paging structure every list call answers with."""
    data = items[start : start + limit]
    return {
        "start": start,
        "limit": limit,
        "count": len(data),
        "total": len(items),
        "data": data,
    }


def _field_item(field_id: int, name: str) -> dict:
    """A field as the fields calls describe it; every field is plain text here."""
    return {
        "ID": field_id,
        "name": name,
        "type": "text",
        "value": "",
        "displayed": True,
        "ordered": False,
        "length": 255,
        "textlines": 0,
        "hidden": False,
        "index": False,
    }


def _collection_field_items(collection: _Collection) -> list[dict]:
    return [_field_item(collection.field_ids[name], name) for name in collection.fields]


def _is_authenticate(path: str) -> bool:
    # The JWT endpoint is served at the root as well, like the real host.
    return path.rstrip("/") in ("", "/authenticate")


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _json_answer(payload: Any, status: int = 200) -> _Answer:
    body = json.dumps(payload).encode()
    return _Answer(status, body, {"Content-Type": "application/json"})


def _error_answer(message: str, status: int = 400) -> _Answer:
    return _json_answer({"error": {"message": message}}, status)


def _fault_answer(fault: Fault) -> _Answer:
    body = fault.body
    if body is None and fault.message is not None:
        body = {"error": {"message": fault.message}}
    elif body is None and fault.status == 400:
        body = {"error": {"message": "Invalid request"}}
    elif body is None and fault.status in (502, 503, 504):
        # The live load balancer answers overload with an HTML page, not JSON.
        body = _LOADBALANCER_PAGE
        content_type = "text/html; charset=utf-8"

    if body is None:
        body = b""
    elif isinstance(body, dict):
        body = json.dumps(body).encode()
        content_type = "application/json"
    elif isinstance(body, str):
        body = body.encode()
        content_type = "text/plain; charset=utf-8"
    elif body is not _LOADBALANCER_PAGE:
        content_type = "application/octet-stream"

    headers = dict(fault.headers)
    overridden = any(name.lower() == "content-type" for name in headers)
    if body and not overridden:
        headers["Content-Type"] = content_type

    return _Answer(fault.status, body, headers)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_json(payload: dict) -> str:
    return _b64url(json.dumps(payload, separators=(",", ":")).encode())


def _describe_shortfall(n: int, timeout: float, records: list[Recorded]) -> str:
    lines = [
        f"expected at least {n} answered requests within {timeout}s, "
        f"got {len(records)}:"
    ]
    for record in records:
        # The stand-in's own token is harmless, but a message that prints
        # tokens teaches bad habits and ends up in CI logs.
        query = "&".join(
            f"{name}={'***' if name == 'access_token' else value}"
            for name, value in record.query
        )
        target = f"{record.path}?{query}" if query else record.path
        lines.append(f"  {record.method} {target} -> {record.status}")

    if not records:
        lines.append("  (nothing arrived)")

    return "\n".join(lines)
