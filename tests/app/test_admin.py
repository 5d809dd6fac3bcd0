"""The operator's page: who gets in, what it shows, what its buttons do.

The page runs in Flask's test client against a real Redis; failed deliveries
are real RQ jobs in RQ's failed registry.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from datetime import timedelta

import pytest
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from app import create_app
from app import failed as failed_store
from app.admin import (
    FORM_TOKEN_LIFETIME_SECONDS,
    apply,
    chart,
    cross_site,
    form_token,
    form_token_valid,
    minute_keys,
    password_matches,
    read_series,
    series_from,
)
from app.intake import DELIVER_FUNCTION
from app.metrics import minute_key
from app.settings import ConfigurationError, load_settings

PASSWORD = "correct horse battery staple"
NOW = 1_796_400_000.0  # 2026-12-04 16:00:00 UTC, a whole minute


def basic(password: str, user: str = "operator") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


AUTH = basic(PASSWORD)


@pytest.fixture(autouse=True)
def no_minute_counters(redis_client):
    """Each test starts and ends without per-minute counters in Redis."""
    yield
    for key in redis_client.scan_iter("relay:metrics:minute:*"):
        redis_client.delete(key)


@pytest.fixture
def queue_name():
    return f"admin-{uuid.uuid4().hex[:8]}"


def make_app(redis_server, queue_name, password: str | None = PASSWORD):
    env = {"REDIS_URL": redis_server.url, "RELAY_QUEUE": queue_name}
    if password is not None:
        env["RELAY_ADMIN_PASSWORD"] = password
    return create_app(load_settings(env), announce=False)


@pytest.fixture
def app(redis_server, queue_name):
    return make_app(redis_server, queue_name)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def queue(app):
    return app.extensions["relay"]["queue"]


def failed_delivery(queue: Queue, reason: str, delivery_id: str | None = None) -> Job:
    """A delivery job as the worker leaves it when Copernica refused it."""
    record = {
        "source": "shopify",
        "topic": "customers/create",
        "delivery_id": delivery_id or str(uuid.uuid4()),
        "body": {"email": "ana.lopez@example.com"},
    }
    job = Job.create(
        DELIVER_FUNCTION,
        args=[record],
        connection=queue.connection,
        serializer=JSONSerializer,
        id=uuid.uuid4().hex,
        origin=queue.name,
    )
    job.meta.update({"reason": reason, "attempts": 1})
    job.save()
    FailedJobRegistry(queue=queue).add(job, ttl=3600, exc_string=reason)
    return job


def page_token(html: str) -> str:
    return re.search(r'name="token" value="([^"]+)"', html).group(1)


# Who gets in.


def test_disabled_without_password(redis_server, queue_name):
    client = make_app(redis_server, queue_name, password=None).test_client()

    assert client.get("/admin").status_code == 404
    assert client.get("/admin", headers=AUTH).status_code == 404
    assert client.post("/admin/failed/requeue", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("wrong password here"),
        basic(PASSWORD[:-1]),
        basic(PASSWORD + "x"),
        {"Authorization": "Bearer " + PASSWORD},
        {"Authorization": "Basic !!!not-base64"},
        # Werkzeug cannot decode this one at all: still 401, not 503.
        {"Authorization": "Basic \xff"},
    ],
    ids=["none", "wrong", "shorter", "longer", "bearer", "garbled", "non-ascii"],
)
def test_refused_without_the_password(client, headers):
    for answer in (
        client.get("/admin", headers=headers),
        client.post("/admin/failed/purge", headers=headers, data={"all": "yes"}),
    ):
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert answer.headers["Cache-Control"] == "no-store"
        assert PASSWORD not in answer.get_data(as_text=True)


def test_any_user_name_with_the_password(client):
    for user in ("operator", "admin", ""):
        assert client.get("/admin", headers=basic(PASSWORD, user)).status_code == 200


def test_password_comparison():
    assert password_matches(PASSWORD, PASSWORD)
    assert not password_matches(None, PASSWORD)
    assert not password_matches("", PASSWORD)
    assert not password_matches(PASSWORD.upper(), PASSWORD)
    assert not password_matches("\udcff", PASSWORD)


def test_page_headers(client):
    answer = client.get("/admin", headers=AUTH)

    assert answer.status_code == 200
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["Cache-Control"] == "no-store"
    # Not no-referrer: with it Chromium sends "Origin: null" with the page's
    # own form posts, which the origin check must refuse.
    assert answer.headers["Referrer-Policy"] == "same-origin"
    policy = answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "form-action 'self'" in policy
    assert "script-src" not in policy
    nonce = re.search(r"'nonce-([^']+)'", policy).group(1)
    assert f'<style nonce="{nonce}">' in answer.get_data(as_text=True)
    assert "<script" not in answer.get_data(as_text=True)


# What it shows.


def test_delivery_ids_are_masked_like_reasons(client, queue):
    # The id comes from a header the signature does not cover.
    failed_delivery(queue, "refused", delivery_id="x leak.id@example.com +31611112222")

    html = client.get("/admin", headers=AUTH).get_data(as_text=True)

    assert "l***@example.com" in html
    assert "leak.id" not in html
    assert "31611112222" not in html


def test_page_shows_queue_retries_failed_and_configuration(client, queue, redis_server):
    queue.enqueue(DELIVER_FUNCTION, {"source": "shopify"})
    queue.enqueue(DELIVER_FUNCTION, {"source": "typeform"})
    queue.enqueue_in(timedelta(minutes=10), DELIVER_FUNCTION, {})
    failed_delivery(
        queue,
        "shopify-customer: Copernica answered 400: email ana.lopez@example.com "
        "is invalid (permanent, not retried; attempt 1)",
        delivery_id="d-400",
    )

    html = client.get("/admin", headers=AUTH).get_data(as_text=True)

    assert re.search(r'id="queued">.*?<strong>2</strong>', html, re.S)
    assert re.search(r'id="retries">.*?<strong>1</strong>', html, re.S)
    assert re.search(r'id="failed-count".*?<strong>1</strong>', html, re.S)
    assert "d-400" in html
    assert "Copernica answered 400: email a***@example.com is invalid" in html
    assert "ana.lopez" not in html
    assert "<td>queue</td><td>" + queue.name in html
    assert "<td>admin_page</td><td>enabled</td>" in html
    assert PASSWORD not in html
    assert redis_server.url not in html or "@" not in redis_server.url


def test_page_shows_the_minute_series(client, redis_client):
    minute = int(time.time() // 60)
    redis_client.set(minute_key("received", minute), 7, ex=7200)
    redis_client.set(minute_key("delivered", minute - 1), 5, ex=7200)

    html = client.get("/admin", headers=AUTH).get_data(as_text=True)

    assert re.search(r'<rect class="received"[^>]*><title>[^<]*: 7 received', html)
    assert re.search(r'<rect class="delivered"[^>]*><title>[^<]*: 5 delivered', html)
    assert "received: 7" in html
    assert "delivered: 5" in html


def test_page_without_redis_is_503_not_500(redis_server, queue_name):
    app = make_app(redis_server, queue_name)
    # A port nothing listens on: the connection is refused at once.
    from app.connections import connect

    relay = app.extensions["relay"]
    relay["redis"] = connect("redis://127.0.0.1:1/0", socket_timeout=1)
    relay["queue"] = Queue(
        queue_name, connection=relay["redis"], serializer=JSONSerializer
    )

    answer = app.test_client().get("/admin", headers=AUTH)

    assert answer.status_code == 503
    assert "Redis does not answer" in answer.get_data(as_text=True)


# The per-minute series.


def test_minute_series_read_with_one_mget(redis_client):
    last = int(NOW // 60)
    redis_client.set(minute_key("received", last), 3)
    redis_client.set(minute_key("received", last - 59), 11)
    redis_client.set(minute_key("received", last - 60), 99)
    redis_client.set(minute_key("delivered", last - 1), 2)
    redis_client.set(minute_key("delivered", last + 1), 99)
    mgets_before = _calls(redis_client, "mget")

    series = read_series(redis_client, NOW + 59)

    assert _calls(redis_client, "mget") == mgets_before + 1
    assert series["received"][-1] == 3
    assert series["received"][0] == 11
    assert sum(series["received"]) == 14
    assert series["delivered"][-2] == 2
    assert sum(series["delivered"]) == 2
    assert len(series["received"]) == len(series["delivered"]) == 60


def _calls(client, command: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


def test_minute_keys_follow_the_shared_schema():
    keys = minute_keys(NOW)
    minute = int(NOW // 60)
    assert keys[0] == f"relay:metrics:minute:received:{minute - 59}"
    assert keys[59] == f"relay:metrics:minute:received:{minute}"
    assert keys[60] == f"relay:metrics:minute:delivered:{minute - 59}"
    assert len(keys) == 120


def test_series_ignores_gaps_and_garbage():
    values = [None] * 120
    values[0], values[1], values[60], values[61] = b"4", b"x", b"-3", "2"
    series = series_from(values)
    assert series["received"][:2] == [4, 0]
    assert series["delivered"][:2] == [0, 2]


def test_chart_scales_to_a_round_top_and_skips_empty_minutes():
    received = [0] * 60
    received[-1] = 37
    delivered = [0] * 60
    delivered[-1] = 20
    drawn = chart({"received": received, "delivered": delivered}, NOW)

    assert [label.text for label in drawn.y_labels] == ["0", "20", "40"]
    assert [bar.kind for bar in drawn.bars] == ["received", "delivered"]
    tall, short = drawn.bars
    assert tall.height == pytest.approx((drawn.bottom - drawn.top) * 37 / 40, 0.01)
    assert tall.y + tall.height == pytest.approx(drawn.bottom)
    assert short.x > tall.x
    assert [label.text for label in drawn.x_labels] == [
        "15:01",
        "15:16",
        "15:31",
        "15:46",
        "16:00",
    ]
    assert drawn.totals == {"received": 37, "delivered": 20}


def test_chart_of_nothing():
    drawn = chart({"received": [0] * 60, "delivered": [0] * 60}, NOW)
    assert drawn.bars == []
    assert [label.text for label in drawn.y_labels] == ["0", "1", "2"]


# The buttons: forgery refused, real clicks work.


def test_post_refused_without_or_with_a_wrong_token(client, queue):
    job = failed_delivery(queue, "r")
    good = form_token(PASSWORD, time.time())
    issued, _, mac = good.partition(".")
    forged = [
        None,
        "",
        "nonsense",
        f"{issued}.{'0' * len(mac)}",
        f"{int(issued) + 1}.{mac}",
        form_token("another password entirely", time.time()),
        form_token(PASSWORD, time.time() - FORM_TOKEN_LIFETIME_SECONDS - 5),
        form_token(PASSWORD, time.time() + 3600),
    ]
    for token in forged:
        data = {"job": job.id} if token is None else {"job": job.id, "token": token}
        for path in ("/admin/failed/requeue", "/admin/failed/purge"):
            answer = client.post(path, headers=AUTH, data=data)
            assert answer.status_code == 403, token
            assert answer.headers["Cache-Control"] == "no-store"

    assert job.id in FailedJobRegistry(queue=queue)
    assert queue.count == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost.evil"},
    ],
    ids=["origin", "null-origin", "cross-site", "same-site", "origin-mismatch"],
)
def test_post_from_another_site_refused_even_with_a_token(client, queue, headers):
    job = failed_delivery(queue, "r")
    token = page_token(client.get("/admin", headers=AUTH).get_data(as_text=True))

    answer = client.post(
        "/admin/failed/purge",
        headers={**AUTH, **headers},
        data={"job": job.id, "token": token},
    )

    assert answer.status_code == 403
    assert job.id in FailedJobRegistry(queue=queue)


def test_cross_site_rules():
    assert cross_site({}, "relay.example") is None
    assert cross_site({"Sec-Fetch-Site": "same-origin"}, "relay.example") is None
    assert cross_site({"Sec-Fetch-Site": "none"}, "relay.example") is None
    # Behind a TLS-ending router the page is http, the browser's origin https.
    assert cross_site({"Origin": "https://Relay.example"}, "relay.example") is None
    assert cross_site({"Origin": "http://[::1"}, "relay.example")


def test_form_token_round_trip():
    token = form_token(PASSWORD, NOW)
    assert form_token_valid(PASSWORD, token, NOW)
    assert form_token_valid(PASSWORD, token, NOW + FORM_TOKEN_LIFETIME_SECONDS)
    assert not form_token_valid(PASSWORD, token, NOW + FORM_TOKEN_LIFETIME_SECONDS + 1)
    assert not form_token_valid(PASSWORD + "!", token, NOW)
    assert not form_token_valid(PASSWORD, "١٢٣." + token.partition(".")[2], NOW)
    assert PASSWORD not in token


def test_requeue_one_with_the_page_token(client, queue):
    job = failed_delivery(queue, "r", delivery_id="d-one")
    other = failed_delivery(queue, "r", delivery_id="d-other")
    page = client.get("/admin", headers=AUTH).get_data(as_text=True)

    answer = client.post(
        "/admin/failed/requeue",
        headers={**AUTH, "Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"},
        data={"job": job.id, "token": page_token(page)},
    )

    assert answer.status_code == 303
    assert answer.headers["Location"].startswith("/admin?")
    registry = FailedJobRegistry(queue=queue)
    assert job.id not in registry
    assert other.id in registry
    assert queue.job_ids == [job.id]
    requeued = Job.fetch(job.id, connection=queue.connection, serializer=JSONSerializer)
    assert requeued.meta["requeued"] == 1
    shown = client.get(answer.headers["Location"], headers=AUTH).get_data(as_text=True)
    assert "1 failed delivery requeued." in shown


def test_purge_one_and_requeue_all(client, queue):
    gone, kept_a, kept_b = (failed_delivery(queue, "r") for _ in range(3))
    token = page_token(client.get("/admin", headers=AUTH).get_data(as_text=True))

    answer = client.post(
        "/admin/failed/purge", headers=AUTH, data={"job": gone.id, "token": token}
    )
    assert answer.status_code == 303
    assert gone.id not in FailedJobRegistry(queue=queue)
    assert not queue.connection.exists(gone.key)

    answer = client.post(
        "/admin/failed/requeue", headers=AUTH, data={"all": "yes", "token": token}
    )
    assert answer.status_code == 303
    assert FailedJobRegistry(queue=queue).count == 0
    assert sorted(queue.job_ids) == sorted([kept_a.id, kept_b.id])


def test_purge_all_needs_the_box_ticked(client, queue):
    jobs = [failed_delivery(queue, "r") for _ in range(2)]
    token = page_token(client.get("/admin", headers=AUTH).get_data(as_text=True))

    answer = client.post(
        "/admin/failed/purge", headers=AUTH, data={"all": "yes", "token": token}
    )
    assert answer.status_code == 303
    assert FailedJobRegistry(queue=queue).count == 2
    shown = client.get(answer.headers["Location"], headers=AUTH).get_data(as_text=True)
    assert "Nothing purged" in shown

    answer = client.post(
        "/admin/failed/purge",
        headers=AUTH,
        data={"all": "yes", "confirm": "yes", "token": token},
    )
    assert answer.status_code == 303
    assert FailedJobRegistry(queue=queue).count == 0
    assert not any(queue.connection.exists(job.key) for job in jobs)


def test_unknown_or_repeated_job_ids_do_nothing_twice(client, queue):
    job = failed_delivery(queue, "r")
    token = page_token(client.get("/admin", headers=AUTH).get_data(as_text=True))
    data = {"job": [job.id, job.id, "no-such-job"], "token": token}

    client.post("/admin/failed/requeue", headers=AUTH, data=data)
    answer = client.post("/admin/failed/requeue", headers=AUTH, data=data)

    assert queue.job_ids == [job.id]
    assert "count=0" in answer.headers["Location"]


def test_notice_shows_no_text_from_the_url(client):
    html = client.get("/admin?done=<b>hacked</b>&count=1", headers=AUTH).get_data(
        as_text=True
    )
    assert "hacked" not in html
    html = client.get("/admin?done=purged&count=<b>", headers=AUTH).get_data(
        as_text=True
    )
    assert "<b>" not in html


# The setting.


def test_password_setting_is_checked_and_never_repeated():
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"RELAY_ADMIN_PASSWORD": "short-pw"})
    assert "RELAY_ADMIN_PASSWORD must be at least 12" in str(raised.value)
    assert "short-pw" not in str(raised.value)

    with pytest.raises(ConfigurationError) as raised:
        load_settings({"RELAY_ADMIN_PASSWORD": "long enough\tbut a tab"})
    assert "control characters" in str(raised.value)

    settings = load_settings({"RELAY_ADMIN_PASSWORD": f"  {PASSWORD} "})
    assert settings.admin_password == PASSWORD
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.describe())
    assert settings.describe()["admin_page"] == "enabled"
    assert load_settings({}).describe()["admin_page"] == "disabled"


def test_a_delivery_requeued_meanwhile_is_not_requeued_again(queue):
    job = failed_delivery(queue, "r")
    # Two clicks choose the same delivery; the first one requeues it.
    chosen = failed_store.find(queue, [job.id])
    later = time.monotonic() + 30
    assert apply(
        queue, failed_store.find(queue, [job.id]), failed_store.requeue, "x", later
    )

    assert apply(queue, chosen, failed_store.requeue, "requeued", later) == 0
    assert queue.job_ids == [job.id]


def test_a_click_stops_at_its_time_budget(queue):
    jobs = [failed_delivery(queue, "r") for _ in range(3)]
    chosen = failed_store.find(queue, [job.id for job in jobs])

    assert apply(queue, chosen, failed_store.purge, "purged", time.monotonic()) == 0
    assert FailedJobRegistry(queue=queue).count == 3


def test_notice_says_when_some_are_left(client):
    html = client.get("/admin?done=requeued&count=500&left=12", headers=AUTH).get_data(
        as_text=True
    )
    assert "500 failed deliveries requeued. 12 still failed: use the button" in html


def test_trailing_slash_leads_to_the_page(client):
    assert client.get("/admin/").status_code == 401
    answer = client.get("/admin/", headers=AUTH)
    assert answer.status_code == 308
    assert answer.headers["Location"] == "/admin"
