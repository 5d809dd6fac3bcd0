"""Copernica REST calls: building them (pure) and sending them (the socket edge).

An API version is a small class that knows where a call goes, how a profile
body is shaped and how the caller authenticates. Everything else, the
selector encoding, the status rules and the sending, is shared, so adding a
version is an addition, not a rewrite. Version 1 is the starting page's: the
token in the ``access_token`` query parameter and a flat body. Version 4
sends ``Authorization: Bearer <JWT>`` (the token exchanged at
authenticate.copernica.com) and wraps profile fields as ``{"fields": {...}}``.

Credentials are attached only at the moment of sending and never stored in a
call, a result or an error message: v1 carries the token in the URL, and URLs
end up in exception texts, logs and, on a 303, in Copernica's Location header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, quote_plus

import requests
import urllib3

from app.logs import mask_text

#: Answers that mean Copernica took the call. A 303 is success on v1/v2 and is
#: never followed: following it would turn the PUT into a GET.
SUCCESS_STATUSES = frozenset({200, 201, 204, 303})

#: Answers worth trying again later; any other status is permanent.
RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))

#: Answers that mean "slow down" for every worker, not only this call.
OVERLOAD_STATUSES = frozenset({429, 503, 504})

#: How much of an unexpected answer body is kept for the operator to read.
ERROR_TEXT_LIMIT = 300

#: Most items one list call returns (Copernica's own maximum).
PAGE_LIMIT = 1000

#: Most bytes taken from an answer at a time.
READ_BYTES = 64 * 1024

Selector = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Call:
    """One HTTP request to Copernica, without credentials."""

    method: str
    path: str  # "/v1/database/1234/profiles", segments already encoded
    params: tuple[tuple[str, str], ...] = ()
    body: Mapping[str, Any] | None = None

    @property
    def query(self) -> str:
        return encode_query(self.params)

    @property
    def target(self) -> str:
        """Path and query as a person reads them in a log or a result."""
        return f"{self.path}?{self.query}" if self.params else self.path

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "url": self.target, "body": self.body}


@dataclass(frozen=True)
class Answer:
    """What came back, reduced to what the relay acts on."""

    status: int
    created_id: str | None = None
    message: str | None = None
    retry_after: str | None = None
    data: Any = None  # the parsed JSON of a successful GET
    # No answer, but the request may have reached Copernica (a read timeout,
    # a connection reset mid-answer): it may still be applied later.
    ambiguous: bool = False

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS_STATUSES

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES

    @property
    def overload(self) -> bool:
        return self.status in OVERLOAD_STATUSES

    @property
    def auth_failed(self) -> bool:
        # Copernica answers a bad v1-v3 token with an ordinary 400; what v4
        # answers for an expired JWT is undocumented, so 401 counts too.
        return self.status == 401 or (
            self.status == 400 and "access token" in (self.message or "").lower()
        )


class TransportError(Exception):
    """No answer at all (refused, reset, timed out); always worth a retry.

    ``sent`` tells whether the request may have reached Copernica: a refused
    connection or a connect timeout never did; a read timeout may have.
    """

    def __init__(self, message: str, sent: bool = True):
        super().__init__(message)
        self.sent = sent


class AuthenticationRefused(Exception):
    """Copernica refused the access token itself; no retry will help."""


def encode_query(params: tuple[tuple[str, str], ...]) -> str:
    # RFC 3986 encoding of every value: "+" must travel as %2B or Copernica
    # reads a space, and "&", "#", "%", "=" would split or cut the filter.
    # The brackets of fields[] are encoded too (urllib3 would do it anyway);
    # Copernica's official PHP class sends them encoded as well.
    return "&".join(
        f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in params
    )


def selector_params(selector: Selector) -> tuple[tuple[str, str], ...]:
    return tuple(("fields[]", f"{name}=={value}") for name, value in selector)


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _segment(value: str | int) -> str:
    return quote(str(value), safe="")


@dataclass(frozen=True)
class ApiV1:
    """The version of the starting page: token in the query, flat JSON body."""

    version: int = 1

    def _path(self, *segments: str | int) -> str:
        return f"/v{self.version}/" + "/".join(_segment(s) for s in segments)

    def profile_put(
        self,
        database: str,
        selector: Selector,
        fields: Mapping[str, Any],
        create: bool,
        async_: bool,
    ) -> Call:
        params = selector_params(selector) + (
            ("create", _flag(create)),
            ("async", _flag(async_)),
        )
        return Call(
            "PUT",
            self._path("database", database, "profiles"),
            params,
            self.profile_body(fields),
        )

    def profile_body(self, fields: Mapping[str, Any]) -> Mapping[str, Any]:
        return dict(fields)

    def profiles_get(
        self, database: str, selector: Selector, limit: int = 2, start: int = 0
    ) -> Call:
        params = selector_params(selector) + (("limit", str(limit)),)
        if start:
            params += (("start", str(start)),)
        return Call("GET", self._path("database", database, "profiles"), params)

    def fields_get(self, database: str, start: int = 0) -> Call:
        params = (("start", str(start)), ("limit", str(PAGE_LIMIT)))
        return Call("GET", self._path("database", database, "fields"), params)

    def collections_get(self, database: str) -> Call:
        params = (("limit", str(PAGE_LIMIT)),)
        return Call("GET", self._path("database", database, "collections"), params)

    def subprofile_put(
        self,
        profile_id: str,
        collection: str,
        selector: Selector,
        fields: Mapping[str, Any],
    ) -> Call:
        # No async here: Copernica does not support it on this call. The body
        # is flat in every version.
        params = selector_params(selector) + (("create", "1"),)
        path = self._path("profile", profile_id, "subprofiles", collection)
        return Call("PUT", path, params, dict(fields))

    def profile_fields_put(self, profile_id: str, fields: Mapping[str, Any]) -> Call:
        return Call(
            "PUT", self._path("profile", profile_id, "fields"), (), dict(fields)
        )

    def profile_delete(self, profile_id: str) -> Call:
        return Call("DELETE", self._path("profile", profile_id))

    def credentials(self, call: Call, secret: str) -> tuple[str, dict[str, str]]:
        """The query string and headers that carry the secret for this version."""
        return encode_query(call.params + (("access_token", secret),)), {}


@dataclass(frozen=True)
class ApiV4(ApiV1):
    """The current version: a JWT in the Authorization header, wrapped body."""

    version: int = 4

    def profile_body(self, fields: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"fields": dict(fields)}

    def credentials(self, call: Call, secret: str) -> tuple[str, dict[str, str]]:
        return encode_query(call.params), {"Authorization": f"Bearer {secret}"}


API_VERSIONS = {1: ApiV1(), 4: ApiV4()}


class Credentials(Protocol):
    def current(self) -> str: ...
    def renew(self) -> str | None: ...
    def secrets(self) -> list[str]: ...


@dataclass
class StaticToken:
    """v1-v3: the access token itself; nothing to renew."""

    token: str = field(repr=False)

    def current(self) -> str:
        return self.token

    def renew(self) -> str | None:
        return None

    def secrets(self) -> list[str]:
        return [self.token]


#: A JWT is renewed when less than this is left of its life (it lives 24 h;
#: Copernica suggests fetching a new one every 6 h or so).
JWT_RENEW_BEFORE_SECONDS = 6 * 3600

#: Assumed life of a JWT whose expiry cannot be read.
JWT_DEFAULT_LIFETIME_SECONDS = 24 * 3600

JWT_CACHE_PREFIX = "relay:copernica-jwt:"

#: Three base64url segments: header, claims, signature.
JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@dataclass
class JwtSource:
    """v4: a JWT exchanged for the access token, shared by all workers in Redis."""

    connection: Any  # redis.Redis
    auth_url: str
    token: str = field(repr=False)
    timeouts: tuple[float, float] = (5.0, 20.0)
    session: requests.Session = field(default_factory=requests.Session, repr=False)
    _jwt: str | None = field(default=None, repr=False)

    @property
    def cache_key(self) -> str:
        # Per token and endpoint: a rotated token, or another account, must
        # never go on using the JWT of the old one.
        digest = hashlib.sha256(f"{self.auth_url}\n{self.token}".encode())
        return JWT_CACHE_PREFIX + digest.hexdigest()[:24]

    def current(self) -> str:
        cached = self.connection.get(self.cache_key)
        if cached:
            self._jwt = cached.decode()
            return self._jwt
        return self.renew()

    def renew(self) -> str:
        try:
            response = self.session.post(
                self.auth_url,
                data={"access_token": self.token},
                timeout=self.timeouts,
                allow_redirects=False,
            )
        except requests.RequestException as error:
            raise TransportError(
                f"token exchange failed ({type(error).__name__})"
            ) from None
        with response:
            if response.status_code in RETRYABLE_STATUSES:
                raise TransportError(f"token exchange answered {response.status_code}")
            if response.status_code != 200:
                raise AuthenticationRefused(
                    f"Copernica refused the access token ({response.status_code})"
                )
            jwt = _jwt_from(response)
        if not JWT_SHAPE.fullmatch(jwt):
            # Anything else would be cached for hours and break every call
            # (or its headers); treat it as a passing fault of the endpoint.
            raise TransportError("token exchange answered something that is not a JWT")

        lifetime = _seconds_left(jwt)
        cache_for = int(
            min(
                max(60, lifetime - JWT_RENEW_BEFORE_SECONDS),
                JWT_DEFAULT_LIFETIME_SECONDS,
            )
        )
        self.connection.set(self.cache_key, jwt, ex=cache_for)
        self._jwt = jwt
        return jwt

    def secrets(self) -> list[str]:
        return [self.token] + ([self._jwt] if self._jwt else [])


def _jwt_from(response: requests.Response) -> str:
    # The format of the answer is undocumented: a bare token or JSON.
    text = response.text.strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, dict):
        for name in ("access_token", "token", "jwt"):
            if isinstance(data.get(name), str):
                return data[name]
    if isinstance(data, str):
        return data
    raise TransportError("token exchange answered something that is not a JWT")


def _seconds_left(jwt: str) -> float:
    try:
        payload = jwt.split(".")[1]
        claims = json.loads(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        )
        left = float(claims["exp"]) - time.time()
    except (IndexError, ValueError, KeyError, TypeError, OverflowError):
        return JWT_DEFAULT_LIFETIME_SECONDS
    return left if math.isfinite(left) else JWT_DEFAULT_LIFETIME_SECONDS


@dataclass
class CopernicaClient:
    """Sends calls over one kept-alive HTTP session, never following redirects."""

    base_url: str
    credentials: Credentials = field(repr=False)
    api: ApiV1
    connect_timeout: float
    read_timeout: float
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        # Proxy settings from the environment are read once here: with
        # trust_env on, requests looks them (and ~/.netrc) up on every call,
        # which cost more than a millisecond per delivery.
        self.session.proxies.update(requests.utils.get_environ_proxies(self.base_url))
        self.session.trust_env = False

    def send(self, call: Call) -> Answer:
        """Send once; on an authentication error renew the JWT and resend once."""
        answer = self._send(call, self.credentials.current())
        if answer.auth_failed:
            renewed = self.credentials.renew()
            if renewed is not None:
                answer = self._send(call, renewed)
        return answer

    def _send(self, call: Call, secret: str) -> Answer:
        query, headers = self.api.credentials(call, secret)
        url = f"{self.base_url}{call.path}" + (f"?{query}" if query else "")
        data = None
        if call.body is not None:
            # ASCII JSON: any text, even a lone surrogate from a sender,
            # encodes; Copernica decodes the \u escapes.
            data = json.dumps(call.body).encode()
            headers = {**headers, "Content-Type": "application/json"}

        # The read timeout bounds each wait for data; the deadline bounds the
        # whole answer, so one trickling a byte at a time cannot outlive the
        # job (whose time limit RQ would count as a permanent failure).
        deadline = time.monotonic() + self.connect_timeout + self.read_timeout
        try:
            response = self.session.request(
                call.method,
                url,
                data=data,
                headers=headers,
                timeout=(self.connect_timeout, self.read_timeout),
                allow_redirects=False,
                stream=True,
            )
            with response:
                response._content = self._read_body(response, deadline)
        except requests.RequestException as error:
            raise TransportError(
                self._describe_error(error), sent=_maybe_sent(error)
            ) from None

        ok = response.status_code in SUCCESS_STATUSES
        return Answer(
            status=response.status_code,
            created_id=response.headers.get("X-Created"),
            message=None if ok else self._error_message(response),
            retry_after=response.headers.get("Retry-After"),
            data=_json_or_none(response) if ok and call.method == "GET" else None,
        )

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        # read1 returns whatever has arrived, so the clock is checked between
        # arrivals instead of after the whole body.
        chunks = []
        try:
            while chunk := response.raw.read1(READ_BYTES, decode_content=True):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"answer not complete within "
                        f"{self.connect_timeout + self.read_timeout:g} s"
                    )
        except urllib3.exceptions.HTTPError as error:
            raise TransportError(f"answer cut off ({type(error).__name__})") from None
        return b"".join(chunks)

    def _describe_error(self, error: requests.RequestException) -> str:
        # requests' own messages hold the whole URL: the token and the
        # selector (an email address). Only the kind of failure is kept.
        if isinstance(error, requests.ConnectTimeout):
            return f"no connection within {self.connect_timeout:g} s (ConnectTimeout)"
        if isinstance(error, requests.ReadTimeout):
            return f"no answer within {self.read_timeout:g} s (ReadTimeout)"
        if isinstance(error, requests.exceptions.SSLError):
            return "TLS handshake or certificate failed (SSLError)"
        if isinstance(error, requests.ConnectionError):
            return "connection refused, reset or closed (ConnectionError)"
        return f"request failed ({type(error).__name__})"

    def _error_message(self, response: requests.Response) -> str:
        try:
            message = str(response.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = response.text.strip() or response.reason or ""
        # Copernica may quote the selector back; its email is masked here, so
        # no reason, log line or failed delivery carries it in clear.
        return mask_text(self._redact(message))[:ERROR_TEXT_LIMIT]

    def _redact(self, text: str) -> str:
        # Copernica may echo the request, and with it the token, in any of
        # the forms a URL carries it.
        for secret in self.credentials.secrets():
            for form in {
                secret,
                quote(secret, safe=""),
                quote(secret),
                quote_plus(secret),
            }:
                text = text.replace(form, "***")
        return text


def _maybe_sent(error: requests.RequestException) -> bool:
    """False only when the request certainly never reached the server."""
    if isinstance(error, requests.ConnectTimeout):
        return False
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return not isinstance(reason, urllib3.exceptions.NewConnectionError)


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
