"""Copernica REST calls: building them (pure) and sending them (the socket edge).

An API version is a small class that knows three things: where a call goes,
how the body is shaped and how the caller authenticates. Everything else, the
selector encoding, the status rules and the sending, is shared, so adding a
version is an addition, not a rewrite.

The access token is attached only at the moment of sending and never stored
in a call, a result or an error message: v1 carries it in the URL, and URLs
end up in exception texts, logs and, on a 303, in Copernica's Location header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

import requests

from worker.mapping import ProfileUpdate

#: Answers that mean Copernica took the call. A 303 is success on v1/v2 and is
#: never followed: following it would turn the PUT into a GET.
SUCCESS_STATUSES = frozenset({200, 201, 204, 303})

#: Answers worth trying again later; any other status is permanent.
RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))

#: How much of an unexpected answer body is kept for the operator to read.
ERROR_TEXT_LIMIT = 300


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

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS_STATUSES

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES


class TransportError(Exception):
    """No answer at all (refused, reset, timed out); always worth a retry."""


def encode_query(params: tuple[tuple[str, str], ...]) -> str:
    # RFC 3986 encoding of every value: "+" must travel as %2B or Copernica
    # reads a space, and "&", "#", "%", "=" would split or cut the filter.
    # The brackets of fields[] are encoded too (urllib3 would do it anyway);
    # Copernica's official PHP class sends them encoded as well.
    return "&".join(
        f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in params
    )


def selector_params(
    selector: tuple[tuple[str, str], ...],
) -> tuple[tuple[str, str], ...]:
    return tuple(("fields[]", f"{name}=={value}") for name, value in selector)


def _flag(value: bool) -> str:
    return "1" if value else "0"


@dataclass(frozen=True)
class ApiV1:
    """The version of the starting page: token in the query, flat JSON body."""

    version: int = 1

    def profile_put(self, update: ProfileUpdate, database: str) -> Call:
        params = selector_params(update.selector) + (
            ("create", _flag(update.create)),
            ("async", _flag(update.async_)),
        )
        return Call(
            method="PUT",
            path=f"/v{self.version}/database/{quote(database, safe='')}/profiles",
            params=params,
            body=self.profile_body(update),
        )

    def profile_body(self, update: ProfileUpdate) -> Mapping[str, Any]:
        return dict(update.fields)

    def authenticate(self, call: Call, token: str) -> tuple[str, dict[str, str]]:
        """The query string and headers that carry the token for this version."""
        return encode_query(call.params + (("access_token", token),)), {}


API_VERSIONS = {1: ApiV1()}


@dataclass
class CopernicaClient:
    """Sends calls over one kept-alive HTTP session, never following redirects."""

    base_url: str
    access_token: str = field(repr=False)
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
        query, headers = self.api.authenticate(call, self.access_token)
        url = f"{self.base_url}{call.path}?{query}"
        data = None
        if call.body is not None:
            # ASCII JSON: any text, even a lone surrogate from a sender,
            # encodes; Copernica decodes the \u escapes.
            data = json.dumps(call.body).encode()
            headers = {**headers, "Content-Type": "application/json"}

        try:
            response = self.session.request(
                call.method,
                url,
                data=data,
                headers=headers,
                timeout=(self.connect_timeout, self.read_timeout),
                allow_redirects=False,
            )
        except requests.RequestException as error:
            raise TransportError(self._describe_error(error)) from None

        with response:
            return Answer(
                status=response.status_code,
                created_id=response.headers.get("X-Created"),
                message=None
                if response.status_code in SUCCESS_STATUSES
                else self._error_message(response),
                retry_after=response.headers.get("Retry-After"),
            )

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
        return self._redact(message)[:ERROR_TEXT_LIMIT]

    def _redact(self, text: str) -> str:
        # Copernica may echo the request, and with it the token, in any of
        # the forms a URL carries it.
        for form in {
            self.access_token,
            quote(self.access_token, safe=""),
            quote(self.access_token),
            quote_plus(self.access_token),
        }:
            text = text.replace(form, "***")
        return text
