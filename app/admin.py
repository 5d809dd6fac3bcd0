"""``/admin``: the operator's page, for people who would rather look than read.

It shows events per minute received and delivered over the last hour, the
queue, the retries waiting, the failed deliveries with their reasons and
buttons to requeue or purge them, and the configuration in effect.

Access takes HTTP basic auth with ``RELAY_ADMIN_PASSWORD``; the user name is
not checked, since it would be one more thing to configure and no secret.
Without the setting the page does not exist (404). Basic auth has no session
and a browser sends the credentials with any request to the site, so each
button also carries a token: an HMAC bound to the password and to when the
page was drawn. Only this page knows it, and requests that say they come from
another site are refused as well.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import redis
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from rq import Queue
from rq.exceptions import InvalidJobOperation
from rq.registry import (
    FailedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from app import failed as failed_store
from app.metrics import MINUTE_KINDS, minute_key

bp = Blueprint("admin", __name__, url_prefix="/admin")

log = logging.getLogger("relay.web")

REALM = "copernica-relay admin"

#: The chart's span. The counters are written by app/metrics.py in every web
#: and worker process, one per kind and minute, kept two hours.
SERIES_MINUTES = 60

#: How many failed deliveries the page lists (the newest); the buttons for
#: all of them still act on every one.
FAILED_SHOWN = 100

#: A click acts for at most this long, well within gunicorn's 25 s timeout;
#: a larger failed list takes another click (the page says so), or the CLI.
ACTION_TIME_BUDGET_SECONDS = 10.0
#: Deliveries read per round when a button acts on all of them.
ACTION_BATCH = 500

#: How long a drawn page's buttons keep working: a working day, so a page
#: left open still acts, while a token that leaked somehow soon stops.
FORM_TOKEN_LIFETIME_SECONDS = 8 * 3600
#: A token dated this far ahead is still taken (clocks of several web hosts).
FORM_TOKEN_CLOCK_SKEW_SECONDS = 60

#: Only these may post to the page: the page itself, or a person typing.
SAME_ORIGIN_FETCH_SITES = ("same-origin", "none")

SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


# The pure parts: credentials, form tokens, origins, the series and the chart.


def password_matches(given: str | None, expected: str) -> bool:
    """Constant-time: digests of equal length hide the password's length too."""
    if given is None:
        return False
    given_digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    expected_digest = hashlib.sha256(expected.encode()).digest()
    return hmac.compare_digest(given_digest, expected_digest)


def form_token(password: str, now: float) -> str:
    issued = int(now)
    return f"{issued}.{_form_mac(password, issued)}"


def form_token_valid(password: str, token: str | None, now: float) -> bool:
    if not token or len(token) > 100:
        return False
    issued_text, dot, mac = token.partition(".")
    if not dot or not (issued_text.isascii() and issued_text.isdigit()):
        return False
    issued = int(issued_text)
    if issued < now - FORM_TOKEN_LIFETIME_SECONDS:
        return False
    if issued > now + FORM_TOKEN_CLOCK_SKEW_SECONDS:
        return False
    expected = _form_mac(password, issued)
    return hmac.compare_digest(mac.encode("utf-8", "surrogatepass"), expected.encode())


def _form_mac(password: str, issued: int) -> str:
    return hmac.new(_form_key(password), str(issued).encode(), "sha256").hexdigest()


@functools.lru_cache(maxsize=4)
def _form_key(password: str) -> bytes:
    # Slow on purpose, and once per process: whoever sees a token cannot try
    # password guesses against it offline at speed.
    return hashlib.pbkdf2_hmac(
        "sha256", password.encode(), b"copernica-relay admin form", 100_000
    )


def cross_site(headers: Mapping[str, str], host: str) -> str | None:
    """Why a browser request comes from another site, or None if it does not.

    Browsers send Sec-Fetch-Site and Origin with a form post; a client that
    sends neither (curl) is left to the token.
    """
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site not in SAME_ORIGIN_FETCH_SITES:
        return f"Sec-Fetch-Site is {site}"
    origin = headers.get("Origin")
    if origin is None:
        return None
    try:
        origin_host = urlsplit(origin).netloc
    except ValueError:
        origin_host = ""
    # The scheme is left out: behind a TLS-ending router the page is served
    # over http while the browser's Origin says https.
    if origin_host.lower() != host.lower():
        return "Origin names another site"
    return None


def minute_keys(now: float, minutes: int = SERIES_MINUTES) -> list[str]:
    """The counters of the last ``minutes`` minutes, oldest first, kind by kind."""
    last = int(now // 60)
    first = last - minutes + 1
    return [
        minute_key(kind, minute)
        for kind in MINUTE_KINDS
        for minute in range(first, last + 1)
    ]


def series_from(
    values: Sequence[bytes | str | None], minutes: int = SERIES_MINUTES
) -> dict[str, list[int]]:
    """MGET's answer for ``minute_keys``, as counts per kind; gaps count 0."""
    counts = [_count(value) for value in values]
    return {
        kind: counts[index * minutes : (index + 1) * minutes]
        for index, kind in enumerate(MINUTE_KINDS)
    }


def _count(value: bytes | str | None) -> int:
    try:
        return max(0, int(value)) if value is not None else 0
    except ValueError:
        return 0


def read_series(connection: redis.Redis, now: float) -> dict[str, list[int]]:
    """Both series of the last hour, in one round trip."""
    return series_from(connection.mget(minute_keys(now)))


@dataclass(frozen=True)
class Bar:
    kind: str
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    #: "end" for the right-most time, so it stays inside the chart.
    anchor: str = "middle"


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    top: int
    bottom: int
    right: int
    bars: list[Bar]
    y_labels: list[Label]
    x_labels: list[Label]
    grid: list[float]
    totals: dict[str, int]


CHART_WIDTH, CHART_HEIGHT = 760, 220
CHART_MARGINS = {"left": 44, "right": 8, "top": 10, "bottom": 26}


def chart(series: Mapping[str, Sequence[int]], now: float) -> Chart:
    """Bars per minute, received beside delivered, on a rounded scale."""
    left, right = CHART_MARGINS["left"], CHART_WIDTH - CHART_MARGINS["right"]
    top, bottom = CHART_MARGINS["top"], CHART_HEIGHT - CHART_MARGINS["bottom"]
    minutes = max(len(values) for values in series.values())
    scale_top = _rounded_up(max(max(v, default=0) for v in series.values()))
    slot = (right - left) / minutes
    bar_width = round(slot * 0.4, 2)
    first_minute = int(now // 60) - minutes + 1

    bars = []
    for offset, kind in enumerate(MINUTE_KINDS):
        for index, count in enumerate(series.get(kind, ())):
            if not count:
                continue
            height = (bottom - top) * count / scale_top
            stamp = _clock(first_minute + index)
            bars.append(
                Bar(
                    kind=kind,
                    x=round(left + index * slot + slot * 0.1 + offset * bar_width, 2),
                    y=round(bottom - height, 2),
                    width=bar_width,
                    height=round(height, 2),
                    title=f"{stamp} UTC: {count} {kind}",
                )
            )

    steps = (0, scale_top / 2, scale_top)
    grid = [round(bottom - (bottom - top) * step / scale_top, 2) for step in steps]
    y_labels = [
        Label(x=left - 6, y=y + 4, text=f"{step:g}")
        for step, y in zip(steps, grid, strict=True)
    ]
    x_labels = [
        Label(
            x=round(left + index * slot + slot / 2, 2),
            y=CHART_HEIGHT - 8,
            text=_clock(first_minute + index),
        )
        for index in range(0, minutes - 5, 15)
    ]
    x_labels.append(
        Label(
            x=right,
            y=CHART_HEIGHT - 8,
            text=_clock(first_minute + minutes - 1),
            anchor="end",
        )
    )
    return Chart(
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        left=left,
        top=top,
        bottom=bottom,
        right=right,
        bars=bars,
        y_labels=y_labels,
        x_labels=x_labels,
        grid=grid,
        totals={kind: sum(series.get(kind, ())) for kind in MINUTE_KINDS},
    )


def _rounded_up(value: int) -> int:
    """The scale's top: 2, 4 or 10 times a power of ten, at least ``value``.

    Its half, the middle grid line, is then a whole count too.
    """
    magnitude = 1
    while True:
        for step in (2, 4, 10):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


def _clock(minute: int) -> str:
    return datetime.fromtimestamp(minute * 60, UTC).strftime("%H:%M")


# The web side.


@bp.before_request
def guard():
    settings = current_app.extensions["relay"]["settings"]
    password = settings.admin_password
    if not password:
        abort(404)

    try:
        credentials = request.authorization
    except ValueError:
        # A header Werkzeug cannot decode (bytes beyond ASCII): no credentials.
        credentials = None
    basic = credentials is not None and credentials.type == "basic"
    given = credentials.password if basic else None
    if not password_matches(given, password):
        # A browser asks without credentials first, every time: not a warning.
        if given is None:
            _refused("credentials missing", logging.INFO)
        else:
            _refused("wrong password")
        return Response(
            "This page needs the admin password.\n",
            401,
            {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            mimetype="text/plain",
        )

    if request.method == "POST":
        reason = cross_site(request.headers, request.host)
        try:
            token = request.form.get("token")
        except OSError:
            # The form did not arrive in time (app/serving.py) or the client
            # went away: nothing to act on.
            _refused("form not received in time")
            return Response(
                "The form did not arrive in time.\n", 408, mimetype="text/plain"
            )
        if reason is None and not form_token_valid(password, token, time.time()):
            reason = "form token missing, wrong or expired"
        if reason:
            _refused(reason)
            return Response(
                "Refused: reload the admin page and use its buttons.\n",
                403,
                mimetype="text/plain",
            )
    return None


@bp.after_request
def protect(response: Response) -> Response:
    # No script at all; the page's one style block carries this nonce.
    policy = ["default-src 'none'"]
    nonce = g.get("admin_style_nonce")
    if nonce:
        policy.append(f"style-src 'nonce-{nonce}'")
    policy += ["form-action 'self'", "frame-ancestors 'none'", "base-uri 'none'"]
    response.headers["Content-Security-Policy"] = "; ".join(policy)
    response.headers.update(SECURITY_HEADERS)
    return response


@bp.get("")
def page():
    relay = current_app.extensions["relay"]
    settings = relay["settings"]
    queue: Queue = relay["queue"]
    now = time.time()
    g.admin_style_nonce = secrets.token_urlsafe(16)
    try:
        overview = _overview(relay["redis"], queue, now)
    except redis.RedisError as error:
        log.warning(
            "admin page: redis unavailable",
            extra={"fields": {"error": type(error).__name__}},
        )
        overview = None
    body = render_template(
        "admin.html",
        overview=overview,
        settings=_setting_rows(settings.describe()),
        token=form_token(settings.admin_password, now),
        notice=_notice(request.args),
        nonce=g.admin_style_nonce,
        drawn_at=datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S"),
    )
    return Response(body, 200 if overview else 503, mimetype="text/html")


@bp.get("/")
def page_with_slash():
    return redirect(url_for(".page"), 308)


@bp.post("/failed/requeue")
def requeue():
    return _act("requeued", failed_store.requeue)


@bp.post("/failed/purge")
def purge():
    if request.form.get("all") == "yes" and request.form.get("confirm") != "yes":
        return redirect(url_for(".page", done="unconfirmed"), 303)
    return _act("purged", failed_store.purge)


def _act(done: str, action: Callable) -> Response:
    queue: Queue = current_app.extensions["relay"]["queue"]
    deadline = time.monotonic() + ACTION_TIME_BUDGET_SECONDS
    left = 0
    try:
        if request.form.get("all") == "yes":
            count = 0
            # Batch by batch: a long failed list is never read whole at once.
            while time.monotonic() < deadline:
                batch = failed_store.newest(queue, ACTION_BATCH)
                if not batch:
                    break
                count += apply(queue, batch, action, done, deadline)
            left = FailedJobRegistry(queue=queue).count
        else:
            chosen = failed_store.find(queue, request.form.getlist("job"))
            count = apply(queue, chosen, action, done, deadline)
    except redis.RedisError as error:
        log.warning(
            "admin page: redis unavailable",
            extra={"fields": {"error": type(error).__name__, "action": done}},
        )
        return Response(
            "Redis is unavailable; nothing or not everything was done. Reload the "
            "admin page to see what is left.\n",
            503,
            mimetype="text/plain",
        )
    # Post, redirect, get: reloading the page afterwards repeats nothing.
    return redirect(url_for(".page", done=done, count=count, left=left), 303)


def apply(
    queue: Queue,
    chosen: Sequence[failed_store.FailedDelivery],
    action: Callable,
    done: str,
    deadline: float,
) -> int:
    """Requeue or purge the chosen deliveries until ``deadline``; how many were."""
    count = 0
    for item in chosen:
        if time.monotonic() >= deadline:
            break
        try:
            action(queue, item)
        except InvalidJobOperation:
            # Another click, or the CLI, took it off the failed list since it
            # was chosen; it is not done twice.
            continue
        count += 1
        log.info(
            f"failed delivery {done} from the admin page",
            extra={
                "fields": {
                    "delivery": item.delivery_id,
                    "job": item.job_id,
                    "source": item.source,
                    "topic": item.topic,
                    "outcome": done,
                }
            },
        )
    return count


def _refused(reason: str, level: int = logging.WARNING) -> None:
    log.log(
        level,
        "admin page refused",
        extra={
            "fields": {
                "reason": reason,
                "method": request.method,
                "path": request.path,
                "remote": request.remote_addr,
            }
        },
    )


def _overview(connection: redis.Redis, queue: Queue, now: float) -> dict:
    series = read_series(connection, now)
    failed_count = FailedJobRegistry(queue=queue).count
    return {
        "chart": chart(series, now),
        "queued": queue.count,
        "in_progress": StartedJobRegistry(queue=queue).count,
        "retries_waiting": ScheduledJobRegistry(queue=queue).count,
        "failed_count": failed_count,
        "failed": [item.summary() for item in failed_store.newest(queue, FAILED_SHOWN)],
    }


def _setting_rows(described: Mapping[str, object]) -> list[tuple[str, str]]:
    rows = []
    for name, value in described.items():
        if isinstance(value, Mapping):
            text = ", ".join(f"{key}: {item}" for key, item in value.items())
        elif isinstance(value, list | tuple):
            text = ", ".join(map(str, value))
        else:
            text = "" if value is None else str(value)
        rows.append((name, text))
    return rows


def _notice(args: Mapping[str, str]) -> str | None:
    # Only known words and a number are shown, never text from the URL.
    done = args.get("done")
    if done == "unconfirmed":
        return "Nothing purged: tick the box to purge every failed delivery."
    if done not in ("requeued", "purged"):
        return None
    count, left = args.get("count", ""), args.get("left", "0")
    if not all(number.isascii() and number.isdigit() for number in (count, left)):
        return None
    noun = "failed delivery" if count == "1" else "failed deliveries"
    notice = f"{count} {noun} {done}."
    if int(left):
        notice += f" {left} still failed: use the button again."
    return notice
