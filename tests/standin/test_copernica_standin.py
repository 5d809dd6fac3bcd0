"""Behaviour of the Copernica stand-in, checked over real HTTP with requests.

These tests pin down the stand-in itself, so the relay's own tests can trust it:
each one states a piece of Copernica behaviour from the API brief, including the
dangerous bits the relay must guard against.
"""

import base64
import http.client
import json
import threading
import time
from urllib.parse import quote, urlsplit

import pytest
import requests

from tests.standin.copernica import (
    RATE_WINDOW_SECONDS,
    UNKNOWN_FIELD_MESSAGE,
    CopernicaStandIn,
    Fault,
)

TOKEN = "standin-token"
SHOP = 1234
SHOP_FIELDS = ["email", "firstname", "lastname", "customer_id", "age"]
ORDER_FIELDS = ["order_id", "total"]

# Short enough to keep the suite fast, long enough for loopback round trips.
TIMEOUT = 5


@pytest.fixture
def standin():
    with CopernicaStandIn(
        access_token=TOKEN,
        databases={SHOP: SHOP_FIELDS},
        database_names={"Shop": SHOP},
        collections={SHOP: {"Orders": ORDER_FIELDS}},
    ) as running:
        yield running
        assert running.errors == []


def put_profiles(
    standin,
    filters,
    body,
    *,
    version=1,
    create=1,
    token=TOKEN,
    database=SHOP,
    extra="",
    **kwargs,
):
    """PUT database profiles with each filter percent-encoded like the relay must."""
    parts = [f"fields[]={quote(expression, safe='')}" for expression in filters]
    parts.append(f"create={create}")
    if token is not None:
        parts.append(f"access_token={token}")
    query = "&".join(parts) + extra
    url = f"{standin.base_url}/v{version}/database/{database}/profiles?{query}"
    kwargs.setdefault("json", body)
    kwargs.setdefault("allow_redirects", False)
    kwargs.setdefault("timeout", TIMEOUT)
    return requests.put(url, **kwargs)


def get_profiles(standin, filters):
    query = "&".join(f"fields[]={quote(expression, safe='')}" for expression in filters)
    url = f"{standin.base_url}/v1/database/{SHOP}/profiles?{query}&access_token={TOKEN}"
    response = requests.get(url, timeout=TIMEOUT)
    assert response.status_code == 200
    return [item["fields"]["email"] for item in response.json()["data"]]


def fetch_jwt(standin):
    response = requests.post(
        f"{standin.base_url}/authenticate",
        data={"access_token": TOKEN},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    return response.text


def error_message(response):
    return response.json()["error"]["message"]


# ------------------------------------------------------------------ tokens


def test_v1_wrong_token_is_a_400_not_a_401(standin):
    response = put_profiles(standin, ["email==a@example.com"], {}, token="wrong")

    assert response.status_code == 400
    assert error_message(response) == "Invalid access token"


def test_v1_missing_token_is_a_400(standin):
    response = put_profiles(standin, ["email==a@example.com"], {}, token=None)

    assert response.status_code == 400
    assert error_message(response) == "Invalid access token"


def test_authenticate_issues_a_jwt_that_expires_after_a_day(standin):
    jwt = fetch_jwt(standin)

    header, payload, signature = jwt.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert abs(claims["exp"] - (time.time() + 86400)) < 5
    assert signature
    assert standin.tokens_issued == 1
    assert standin.requests[0].path == "/authenticate"


def test_authenticate_with_wrong_token_is_a_400(standin):
    response = requests.post(
        f"{standin.base_url}/authenticate",
        data={"access_token": "wrong"},
        timeout=TIMEOUT,
    )

    assert response.status_code == 400
    assert error_message(response) == "Invalid access token"
    assert standin.tokens_issued == 0


def test_v4_bearer_flow_creates_then_updates(standin):
    jwt = fetch_jwt(standin)
    headers = {"Authorization": f"Bearer {jwt}"}
    body = {"fields": {"email": "a@example.com", "firstname": "Ann"}}

    created = put_profiles(
        standin, ["email==a@example.com"], body, version=4, token=None, headers=headers
    )
    updated = put_profiles(
        standin,
        ["email==a@example.com"],
        {"fields": {"firstname": "Anna"}},
        version=4,
        token=None,
        headers=headers,
    )

    assert created.status_code == 201
    assert created.headers["X-Created"] == "1001"
    assert updated.status_code == 204
    assert "X-Created" not in updated.headers
    assert standin.profiles(SHOP)[0]["fields"]["firstname"] == "Anna"


def test_v4_rejects_missing_unknown_and_expired_bearer_with_401(standin):
    jwt = fetch_jwt(standin)
    body = {"fields": {"email": "a@example.com"}}

    def put_with(headers):
        return put_profiles(
            standin,
            ["email==a@example.com"],
            body,
            version=4,
            token=None,
            headers=headers,
        )

    missing = put_with({})
    unknown = put_with({"Authorization": f"Bearer {jwt[:-2]}xx"})
    standin.expire_tokens()
    expired = put_with({"Authorization": f"Bearer {jwt}"})

    assert [missing.status_code, unknown.status_code, expired.status_code] == [
        401,
        401,
        401,
    ]
    assert error_message(expired) == "Invalid access token"
    assert standin.profiles(SHOP) == []


def test_v4_rejects_access_token_in_the_url_with_400(standin):
    jwt = fetch_jwt(standin)

    response = put_profiles(
        standin,
        ["email==a@example.com"],
        {"fields": {"email": "a@example.com"}},
        version=4,
        headers={"Authorization": f"Bearer {jwt}"},
    )

    assert response.status_code == 400
    assert standin.profiles(SHOP) == []


# ----------------------------------------------------- PUT database profiles


def test_put_creates_a_profile_and_reports_x_created(standin):
    response = put_profiles(
        standin,
        ["email==a@example.com"],
        {"email": "a@example.com", "firstname": "Ann"},
    )

    assert response.status_code == 303
    assert response.headers["X-Created"] == "1001"
    assert response.content == b""
    profile = standin.profiles(SHOP)[0]
    assert profile["id"] == 1001
    assert profile["fields"]["email"] == "a@example.com"
    assert profile["fields"]["firstname"] == "Ann"


def test_put_updates_only_the_profile_matched_by_the_selector(standin):
    ann = standin.add_profile(SHOP, {"email": "a@example.com", "firstname": "Ann"})
    bob = standin.add_profile(SHOP, {"email": "b@example.com", "firstname": "Bob"})

    response = put_profiles(standin, ["email==b@example.com"], {"lastname": "Brown"})

    assert response.status_code == 303
    assert "X-Created" not in response.headers
    by_id = {profile["id"]: profile["fields"] for profile in standin.profiles(SHOP)}
    assert by_id[bob]["lastname"] == "Brown"
    assert by_id[ann]["lastname"] == ""


def test_several_filters_are_anded(standin):
    standin.add_profile(SHOP, {"email": "a@example.com", "customer_id": "1"})
    standin.add_profile(SHOP, {"email": "a@example.com", "customer_id": "2"})

    put_profiles(
        standin, ["email==a@example.com", "customer_id==2"], {"firstname": "Two"}
    )

    names = [profile["fields"]["firstname"] for profile in standin.profiles(SHOP)]
    assert names == ["", "Two"]


def test_plus_in_email_matches_only_when_sent_as_percent_2b(standin):
    standin.add_profile(SHOP, {"email": "a+shop@example.com"})
    url = f"{standin.base_url}/v1/database/{SHOP}/profiles"

    # A raw "+" in a query string is a space once decoded, so this selects
    # "a shop@example.com" and, with create=0, changes nothing.
    raw = requests.put(
        f"{url}?fields[]=email==a+shop@example.com&create=0&access_token={TOKEN}",
        json={"firstname": "Raw"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    encoded = requests.put(
        f"{url}?fields[]=email%3D%3Da%2Bshop%40example.com&create=0"
        f"&access_token={TOKEN}",
        json={"firstname": "Encoded"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )

    assert raw.status_code == encoded.status_code == 303
    assert standin.requests[0].query_values("fields[]") == ["email==a shop@example.com"]
    assert standin.profiles(SHOP)[0]["fields"]["firstname"] == "Encoded"


def test_unknown_filter_field_is_ignored_and_the_put_updates_every_profile(standin):
    # This is the live API's most dangerous habit: a misspelt key field drops
    # the only filter, and the PUT then overwrites the whole database.
    standin.add_profile(SHOP, {"email": "a@example.com"})
    standin.add_profile(SHOP, {"email": "b@example.com"})

    response = put_profiles(standin, ["emial==a@example.com"], {"firstname": "Oops"})

    assert response.status_code == 303
    assert "X-Created" not in response.headers
    names = [profile["fields"]["firstname"] for profile in standin.profiles(SHOP)]
    assert names == ["Oops", "Oops"]
    assert standin.ignored_filters == ["emial==a@example.com"]


@pytest.mark.parametrize(
    "expression", ["email=a@example.com", "email=>a", "email ==a@example.com", ""]
)
def test_filter_without_a_recognisable_operator_or_known_name_is_ignored(
    standin, expression
):
    standin.add_profile(SHOP, {"email": "a@example.com"})
    standin.add_profile(SHOP, {"email": "b@example.com"})

    put_profiles(standin, [expression], {"firstname": "Everyone"})

    assert [p["fields"]["firstname"] for p in standin.profiles(SHOP)] == [
        "Everyone",
        "Everyone",
    ]
    assert standin.ignored_filters == [expression]


def test_whole_expression_is_trimmed_but_inner_spaces_count(standin):
    standin.add_profile(SHOP, {"email": "a@example.com", "lastname": " Doe"})

    assert get_profiles(standin, ["lastname== Doe"]) == ["a@example.com"]
    assert get_profiles(standin, ["lastname==Doe"]) == []
    assert get_profiles(standin, ["  lastname== Doe  "]) == ["a@example.com"]


def test_field_and_database_names_match_case_insensitively(standin):
    standin.add_profile(SHOP, {"email": "a@example.com"})

    response = put_profiles(
        standin,
        ["EMAIL==a@example.com"],
        {"FirstName": "Ann", "nickname": "ignored"},
        database="sHoP",
    )

    assert response.status_code == 303
    assert standin.profiles("shop")[0]["fields"] == {
        "email": "a@example.com",
        "firstname": "Ann",
        "lastname": "",
        "customer_id": "",
        "age": "",
    }


def test_equality_is_case_sensitive(standin):
    standin.add_profile(SHOP, {"email": "Ann@Example.com"})

    assert get_profiles(standin, ["email==ann@example.com"]) == []
    assert get_profiles(standin, ["email==Ann@Example.com"]) == ["Ann@Example.com"]


def test_like_uses_percent_and_underscore(standin):
    for email in ["ann@example.com", "anne@example.com", "bob@example.org"]:
        standin.add_profile(SHOP, {"email": email})

    assert get_profiles(standin, ["email=~ann@%"]) == ["ann@example.com"]
    assert get_profiles(standin, ["email=~ann_@%"]) == ["anne@example.com"]
    assert get_profiles(standin, ["email!~%.com"]) == ["bob@example.org"]


def test_ordering_operators_compare_numbers_numerically(standin):
    standin.add_profile(SHOP, {"email": "nine@example.com", "age": "9"})
    standin.add_profile(SHOP, {"email": "ten@example.com", "age": 10})

    assert get_profiles(standin, ["age>9"]) == ["ten@example.com"]
    assert get_profiles(standin, ["age>=9", "age<10"]) == ["nine@example.com"]
    assert get_profiles(standin, ["age<>9"]) == ["ten@example.com"]


def test_special_id_filter_selects_by_profile_id(standin):
    standin.add_profile(SHOP, {"email": "a@example.com"})
    bob = standin.add_profile(SHOP, {"email": "b@example.com"})

    put_profiles(standin, [f"id=={bob}"], {"firstname": "Bob"})

    assert [p["fields"]["firstname"] for p in standin.profiles(SHOP)] == ["", "Bob"]
    assert standin.ignored_filters == []


def test_missing_fields_parameter_is_a_400(standin):
    response = put_profiles(standin, [], {"email": "a@example.com"})

    assert response.status_code == 400
    assert error_message(response) == "URL parameter fields is required"


def test_unknown_database_is_a_400(standin):
    by_id = put_profiles(standin, ["email==a@example.com"], {}, database=999)
    by_name = put_profiles(standin, ["email==a@example.com"], {}, database="nope")

    assert (
        error_message(by_id)
        == error_message(by_name)
        == ("No database with supplied ID")
    )


@pytest.mark.parametrize(
    ("version", "kwargs"),
    [
        (1, {"json": ["email", "a@example.com"]}),
        (
            1,
            {
                "json": None,
                "data": "email=a@example.com",
                "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            },
        ),
        (
            1,
            {
                "json": None,
                "data": "{not json",
                "headers": {"Content-Type": "application/json"},
            },
        ),
        (4, {"json": {"fields": "email=a@example.com"}}),
    ],
)
def test_body_that_is_not_a_json_object_is_a_400(standin, version, kwargs):
    headers = kwargs.pop("headers", {})
    token = TOKEN
    if version == 4:
        headers["Authorization"] = f"Bearer {fetch_jwt(standin)}"
        token = None

    response = put_profiles(
        standin,
        ["email==a@example.com"],
        None,
        version=version,
        token=token,
        headers=headers,
        **kwargs,
    )

    assert response.status_code == 400
    assert error_message(response) == "Invalid data provided"
    assert standin.profiles(SHOP) == []


def test_v2_style_body_sent_to_v1_creates_an_empty_profile(standin):
    # Unknown body fields are ignored, and "fields" is not a database field.
    response = put_profiles(
        standin, ["email==a@example.com"], {"fields": {"email": "a@example.com"}}
    )

    assert response.headers["X-Created"] == "1001"
    assert standin.profiles(SHOP)[0]["fields"]["email"] == ""


def test_created_profile_gets_body_fields_but_not_filter_values(standin):
    put_profiles(standin, ["email==a@example.com"], {"firstname": "Ann"})

    assert standin.profiles(SHOP)[0]["fields"]["email"] == ""


def test_create_false_with_no_match_succeeds_and_changes_nothing(standin):
    response = put_profiles(
        standin, ["email==a@example.com"], {"email": "a@example.com"}, create=0
    )

    assert response.status_code == 303
    assert "X-Created" not in response.headers
    assert standin.profiles(SHOP) == []


@pytest.mark.parametrize("value", ["true", "YES", "2", "-1"])
def test_create_accepts_copernica_true_values(standin, value):
    response = put_profiles(
        standin, ["email==a@example.com"], {"email": "a@example.com"}, create=value
    )

    assert response.headers["X-Created"] == "1001"


def test_async_put_still_applies_and_reports_x_created(standin):
    response = put_profiles(
        standin, ["email==a@example.com"], {"email": "a@example.com"}, extra="&async=1"
    )

    assert response.headers["X-Created"] == "1001"
    assert len(standin.profiles(SHOP)) == 1


def test_303_location_echoes_the_request_including_the_access_token(standin):
    response = put_profiles(
        standin, ["email==a@example.com"], {"email": "a@example.com"}
    )

    expected = f"/database/{SHOP}/profiles?{standin.requests[0].raw_query}"
    assert response.status_code == 303
    assert response.headers["Location"] == expected
    assert f"access_token={TOKEN}" in response.headers["Location"]


def test_following_the_303_turns_the_put_into_a_get(standin):
    put_profiles(
        standin,
        ["email==a@example.com"],
        {"email": "a@example.com"},
        allow_redirects=True,
    )

    assert [request.method for request in standin.requests] == ["PUT", "GET"]
    assert standin.requests[1].path == f"/database/{SHOP}/profiles"


def test_put_status_200_sends_no_location():
    with CopernicaStandIn(
        access_token=TOKEN, databases={SHOP: SHOP_FIELDS}, put_status=200
    ) as standin:
        response = put_profiles(
            standin, ["email==a@example.com"], {"email": "a@example.com"}
        )

    assert response.status_code == 200
    assert "Location" not in response.headers
    assert response.headers["X-Created"] == "1001"


def test_v3_put_answers_201_when_created_and_204_otherwise(standin):
    body = {"fields": {"email": "a@example.com"}}

    created = put_profiles(standin, ["email==a@example.com"], body, version=3)
    updated = put_profiles(standin, ["email==a@example.com"], body, version=3)

    assert (created.status_code, updated.status_code) == (201, 204)


# ------------------------------------------------------------ other calls


def test_get_fields_lists_the_database_fields(standin):
    response = requests.get(
        f"{standin.base_url}/v1/database/{SHOP}/fields?access_token={TOKEN}",
        timeout=TIMEOUT,
    )

    page = response.json()
    assert (page["start"], page["count"], page["total"]) == (0, 5, 5)
    assert [item["name"] for item in page["data"]] == SHOP_FIELDS


def test_get_profiles_pages_matching_profiles(standin):
    profile_id = standin.add_profile(SHOP, {"email": "a@example.com"})

    response = requests.get(
        f"{standin.base_url}/v1/database/{SHOP}/profiles?access_token={TOKEN}"
        "&fields[]=email%3D%3Da%40example.com",
        timeout=TIMEOUT,
    )

    page = response.json()
    assert page["count"] == page["total"] == 1
    item = page["data"][0]
    assert (item["ID"], item["database"], item["removed"]) == (profile_id, SHOP, False)
    assert item["fields"]["email"] == "a@example.com"


def test_subprofile_upsert_and_profile_delete(standin):
    profile_id = standin.add_profile(SHOP, {"email": "a@example.com"})
    url = (
        f"{standin.base_url}/v1/profile/{profile_id}/subprofiles/orders"
        f"?fields[]=order_id%3D%3D7&create=1&access_token={TOKEN}"
    )

    created = requests.put(
        url, json={"order_id": "7", "total": 10}, allow_redirects=False, timeout=TIMEOUT
    )
    updated = requests.put(
        url, json={"total": 12}, allow_redirects=False, timeout=TIMEOUT
    )
    subprofiles = standin.subprofiles(profile_id, "Orders")
    deleted = requests.delete(
        f"{standin.base_url}/v1/profile/{profile_id}?access_token={TOKEN}",
        timeout=TIMEOUT,
    )
    again = requests.delete(
        f"{standin.base_url}/v1/profile/{profile_id}?access_token={TOKEN}",
        timeout=TIMEOUT,
    )

    assert created.status_code == updated.status_code == 303
    assert "X-Created" not in created.headers
    assert [item["fields"] for item in subprofiles] == [{"order_id": "7", "total": 12}]
    assert deleted.status_code == 200
    assert error_message(again) == "This profile has already been removed"
    assert standin.profiles(SHOP) == []


def test_subprofile_put_on_unknown_profile_is_a_400(standin):
    response = requests.put(
        f"{standin.base_url}/v1/profile/42/subprofiles/orders"
        f"?fields[]=order_id%3D%3D7&access_token={TOKEN}",
        json={"order_id": "7"},
        timeout=TIMEOUT,
    )

    assert error_message(response) == "No entity with supplied ID"


def test_unknown_path_or_method_is_invalid_method(standin):
    base = standin.base_url
    unknown_path = requests.get(
        f"{base}/v1/nothing?access_token={TOKEN}", timeout=TIMEOUT
    )
    wrong_method = requests.patch(
        f"{base}/v1/database/{SHOP}/profiles?access_token={TOKEN}", timeout=TIMEOUT
    )

    assert (
        error_message(unknown_path) == error_message(wrong_method) == ("Invalid method")
    )


# ------------------------------------------------------------ recording


def test_both_bracket_spellings_decode_to_fields_brackets(standin):
    host, port = urlsplit(standin.base_url).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    query = (
        f"fields[]=email%3D%3Da%40example.com"
        f"&fields%5B%5D=firstname%3D%3DAnn&access_token={TOKEN}"
    )
    try:
        connection.request("GET", f"/v1/database/{SHOP}/profiles?{query}")
        connection.getresponse().read()
    finally:
        connection.close()

    recorded = standin.wait_for_requests(1)[0]
    assert recorded.raw_query == query
    assert recorded.query_values("fields[]") == [
        "email==a@example.com",
        "firstname==Ann",
    ]
    assert recorded.status == 200


def test_records_body_json_headers_and_status(standin):
    put_profiles(standin, ["email==a@example.com"], {"email": "a@example.com"})

    recorded = standin.wait_for_requests(1)[0]
    assert (recorded.method, recorded.path) == ("PUT", f"/v1/database/{SHOP}/profiles")
    assert recorded.headers["content-type"] == "application/json"
    assert recorded.json == {"email": "a@example.com"}
    assert json.loads(recorded.body) == recorded.json
    assert recorded.status == 303


def test_a_client_session_reuses_its_connection(standin):
    with requests.Session() as session:
        for _ in range(3):
            session.get(
                f"{standin.base_url}/v1/database/{SHOP}/fields?access_token={TOKEN}",
                timeout=TIMEOUT,
            )
        manager = session.get_adapter(standin.base_url).poolmanager
        connections = sum(
            manager.pools[key].num_connections for key in manager.pools.keys()
        )

    assert connections == 1


def test_clear_forgets_requests_profiles_and_faults(standin):
    standin.add_profile(SHOP, {"email": "a@example.com"})
    standin.add_fault(Fault(503))
    put_profiles(standin, ["email==a@example.com"], {})
    standin.add_fault(Fault(503))

    standin.clear()

    assert (standin.requests, standin.profiles(SHOP), standin.faults) == ([], [], [])
    assert standin.add_profile(SHOP, {"email": "b@example.com"}) == 1001


def test_wait_for_requests_timeout_lists_what_arrived(standin):
    put_profiles(standin, ["email==a@example.com"], {})

    with pytest.raises(AssertionError) as failure:
        standin.wait_for_requests(2, timeout=0.2)

    message = str(failure.value)
    assert "expected at least 2" in message
    assert f"PUT /v1/database/{SHOP}/profiles" in message
    assert "-> 303" in message
    assert TOKEN not in message


# ------------------------------------------------------------------ faults


def test_status_fault_sends_retry_after_and_loadbalancer_page_once(standin):
    standin.add_fault(Fault(503, headers={"Retry-After": "2"}))

    overloaded = put_profiles(
        standin, ["email==a@example.com"], {"email": "a@example.com"}
    )
    normal = put_profiles(standin, ["email==a@example.com"], {"email": "a@example.com"})

    assert overloaded.status_code == 503
    assert overloaded.headers["Retry-After"] == "2"
    assert "Loadbalancer Error" in overloaded.text
    assert normal.status_code == 303
    assert [request.status for request in standin.requests] == [503, 303]
    assert len(standin.profiles(SHOP)) == 1


def test_400_fault_with_message_answers_error_json(standin):
    standin.add_fault(Fault(400, message="Failed to create profile"))

    response = put_profiles(standin, ["email==a@example.com"], {})

    assert response.status_code == 400
    assert error_message(response) == "Failed to create profile"


def test_delay_fault_without_status_answers_normally_but_late(standin):
    standin.add_fault(Fault(status=None, delay=0.3))

    started = time.monotonic()
    response = put_profiles(
        standin, ["email==a@example.com"], {"email": "a@example.com"}
    )

    assert time.monotonic() - started >= 0.3
    assert response.status_code == 303
    assert response.headers["X-Created"] == "1001"


def test_delayed_update_is_applied_even_after_the_client_timed_out(standin):
    standin.add_fault(Fault(status=None, delay=0.4))

    with pytest.raises(requests.ReadTimeout):
        put_profiles(
            standin, ["email==a@example.com"], {"email": "a@example.com"}, timeout=0.1
        )

    assert standin.wait_for_requests(1, timeout=TIMEOUT)[0].status == 303
    assert len(standin.profiles(SHOP)) == 1


def test_hang_fault_is_closed_without_answer_by_stop(standin):
    standin.add_fault(Fault(hang=True))
    outcome = []

    def call():
        try:
            put_profiles(standin, ["email==a@example.com"], {})
        except requests.ConnectionError as error:
            outcome.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    standin.wait_for_requests(1, timeout=TIMEOUT)
    started = time.monotonic()
    standin.stop()
    caller.join(timeout=TIMEOUT)

    assert time.monotonic() - started < 3
    assert not caller.is_alive()
    assert len(outcome) == 1
    assert standin.requests[0].status is None


def test_hang_fault_is_answered_by_release(standin):
    standin.add_fault(Fault(hang=True))
    responses = []
    caller = threading.Thread(
        target=lambda: responses.append(put_profiles(standin, ["email==a@x.com"], {}))
    )
    caller.start()
    standin.wait_for_requests(1, timeout=TIMEOUT)

    standin.release()
    caller.join(timeout=TIMEOUT)

    assert [response.status_code for response in responses] == [503]
    assert standin.requests[0].status == 503


def test_drop_fault_closes_the_connection_without_answer(standin):
    standin.add_fault(Fault(drop=True))

    with pytest.raises(requests.ConnectionError):
        put_profiles(standin, ["email==a@example.com"], {"email": "a@example.com"})

    assert standin.wait_for_requests(1)[0].status is None
    assert standin.profiles(SHOP) == []


def test_fault_times_consumes_that_many_consecutive_requests(standin):
    standin.add_fault(Fault(502, times=2))

    statuses = [
        put_profiles(standin, ["email==a@example.com"], {}).status_code
        for _ in range(3)
    ]

    assert statuses == [502, 502, 303]
    assert standin.faults == []


def test_fault_applies_only_to_matching_method_and_path(standin):
    profile_id = standin.add_profile(SHOP, {"email": "a@example.com"})
    standin.add_fault(Fault(504, method="put", path_contains="/subprofiles/"))

    profiles = put_profiles(standin, ["email==a@example.com"], {})
    orders = requests.put(
        f"{standin.base_url}/v1/profile/{profile_id}/subprofiles/orders"
        f"?fields[]=order_id%3D%3D7&create=1&access_token={TOKEN}",
        json={"order_id": "7"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )

    assert (profiles.status_code, orders.status_code) == (303, 504)
    assert standin.subprofiles(profile_id, "orders") == []


def test_faults_are_recorded_with_the_status_sent(standin):
    standin.add_fault(Fault(429, body={"error": {"message": "slow down"}}))

    response = put_profiles(standin, ["email==a@example.com"], {})

    assert response.json() == {"error": {"message": "slow down"}}
    assert standin.wait_for_requests(1)[0].status == 429


def test_upsert_window_lets_two_concurrent_creates_make_two_profiles():
    import threading

    with CopernicaStandIn(
        access_token="t", databases={1: ["email"]}, upsert_window=0.3
    ) as standin:
        url = (
            f"{standin.base_url}/v1/database/1/profiles?"
            "fields[]=email%3D%3Dnew%40example.com&create=1&access_token=t"
        )

        def put():
            requests.put(url, json={"email": "new@example.com"}, timeout=5)

        threads = [threading.Thread(target=put) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert len(standin.profiles(1)) == 2


# ------------------------------------------------------------- collections


def api_get(standin, path, version=1, **kwargs):
    """GET ``/v{version}/{path}`` with the v1-v3 token in the URL."""
    separator = "&" if "?" in path else "?"
    url = f"{standin.base_url}/v{version}/{path}{separator}access_token={TOKEN}"
    return requests.get(url, timeout=TIMEOUT, **kwargs)


def api_put(standin, path, body, version=1, **kwargs):
    """PUT ``/v{version}/{path}``, as a v1-v3 client or, for v4, with a JWT."""
    url = f"{standin.base_url}/v{version}/{path}"
    headers = kwargs.pop("headers", {})
    if version == 4:
        headers["Authorization"] = f"Bearer {fetch_jwt(standin)}"
    else:
        url += f"{'&' if '?' in path else '?'}access_token={TOKEN}"
    kwargs.setdefault("allow_redirects", False)
    return requests.put(url, json=body, headers=headers, timeout=TIMEOUT, **kwargs)


@pytest.mark.parametrize("database", [SHOP, "shop"])
def test_database_collections_embed_each_collections_fields(standin, database):
    response = api_get(standin, f"database/{database}/collections")

    page = response.json()
    assert response.status_code == 200
    assert (page["start"], page["count"], page["total"]) == (0, 1, 1)
    orders = page["data"][0]
    assert (orders["ID"], orders["name"], orders["database"]) == (1, "Orders", SHOP)
    collection_fields = api_get(standin, f"collection/{orders['ID']}/fields").json()
    assert orders["fields"] == collection_fields
    assert [item["name"] for item in orders["fields"]["data"]] == ORDER_FIELDS


def test_collection_field_ids_do_not_repeat_database_field_ids(standin):
    database_fields = api_get(standin, f"database/{SHOP}/fields").json()["data"]
    collection_fields = api_get(standin, "collection/1/fields").json()["data"]

    ids = [item["ID"] for item in database_fields + collection_fields]
    assert len(set(ids)) == len(ids) == 7
    assert set(collection_fields[0]) == set(database_fields[0])


def test_database_without_collections_lists_none():
    with CopernicaStandIn(access_token=TOKEN, databases={SHOP: SHOP_FIELDS}) as standin:
        page = api_get(standin, f"database/{SHOP}/collections").json()

    assert (page["count"], page["total"], page["data"]) == (0, 0, [])


@pytest.mark.parametrize("reference", ["2", "orders", "Orders"])
def test_collection_fields_need_a_known_collection_id(standin, reference):
    response = api_get(standin, f"collection/{reference}/fields")

    assert response.status_code == 400
    assert error_message(response) == "No collection with given ID"


def test_collection_calls_follow_the_v4_credential_rules(standin):
    url = f"{standin.base_url}/v4/collection/1/fields"
    jwt = fetch_jwt(standin)

    anonymous = requests.get(url, timeout=TIMEOUT)
    with_jwt = requests.get(
        url, headers={"Authorization": f"Bearer {jwt}"}, timeout=TIMEOUT
    )

    assert anonymous.status_code == 401
    assert with_jwt.json()["total"] == len(ORDER_FIELDS)


# ------------------------------------------------------ profile fields PUT


@pytest.mark.parametrize(
    ("version", "status"), [(1, 303), (2, 303), (3, 204), (4, 204)]
)
def test_put_profile_fields_takes_a_flat_body_in_every_version(
    standin, version, status
):
    profile_id = standin.add_profile(SHOP, {"email": "a@example.com"})

    response = api_put(
        standin,
        f"profile/{profile_id}/fields",
        {"FIRSTNAME": "Ann", "nickname": "ignored"},
        version=version,
    )

    assert response.status_code == status
    assert "X-Created" not in response.headers
    fields = standin.profiles(SHOP)[0]["fields"]
    assert (fields["firstname"], fields["email"]) == ("Ann", "a@example.com")
    assert "FIRSTNAME" not in fields and "nickname" not in fields


def test_put_profile_fields_303_echoes_the_request(standin):
    profile_id = standin.add_profile(SHOP, {"email": "a@example.com"})

    response = api_put(standin, f"profile/{profile_id}/fields", {"age": 30})

    assert response.headers["Location"] == (
        f"/profile/{profile_id}/fields?access_token={TOKEN}"
    )


def test_put_profile_fields_answers_200_when_put_status_is_200():
    with CopernicaStandIn(
        access_token=TOKEN, databases={SHOP: SHOP_FIELDS}, put_status=200
    ) as standin:
        profile_id = standin.add_profile(SHOP, {"email": "a@example.com"})
        response = api_put(standin, f"profile/{profile_id}/fields", {}, version=2)

    assert response.status_code == 200
    assert "Location" not in response.headers


def test_put_profile_fields_with_a_wrapped_body_changes_nothing(standin):
    profile_id = standin.add_profile(SHOP, {"email": "a@example.com"})

    response = api_put(
        standin, f"profile/{profile_id}/fields", {"fields": {"firstname": "Ann"}}, 4
    )

    assert response.status_code == 204
    assert standin.profiles(SHOP)[0]["fields"]["firstname"] == ""


@pytest.mark.parametrize("reference", ["42", "nobody"])
def test_put_profile_fields_on_unknown_profile_is_a_400(standin, reference):
    response = api_put(standin, f"profile/{reference}/fields", {"email": "a@x.com"})

    assert response.status_code == 400
    assert error_message(response) == "No entity with supplied ID"


# ------------------------------------------------------ subprofiles GET


def put_order(standin, profile_id, order_id, total, collection="orders"):
    response = api_put(
        standin,
        f"profile/{profile_id}/subprofiles/{collection}"
        f"?fields[]=order_id%3D%3D{order_id}&create=1",
        {"order_id": order_id, "total": total},
    )
    assert response.status_code == 303


@pytest.mark.parametrize("collection", ["1", "ORDERS"])
def test_get_profile_subprofiles_pages_that_profiles_subprofiles(standin, collection):
    ann = standin.add_profile(SHOP, {"email": "a@example.com"})
    bob = standin.add_profile(SHOP, {"email": "b@example.com"})
    put_order(standin, ann, "7", 10)
    put_order(standin, bob, "8", 20)
    put_order(standin, ann, "9", 30, collection="1")

    response = api_get(standin, f"profile/{ann}/subprofiles/{collection}")

    page = response.json()
    assert (page["start"], page["count"], page["total"]) == (0, 2, 2)
    first = page["data"][0]
    assert (first["ID"], first["profile"], first["collection"]) == (500001, ann, 1)
    assert first["fields"] == {"order_id": "7", "total": 10}
    assert [item["fields"]["order_id"] for item in page["data"]] == ["7", "9"]
    assert [item["id"] for item in standin.subprofiles(ann, "orders")] == [
        item["ID"] for item in page["data"]
    ]


def test_get_profile_subprofiles_filters_and_pages(standin):
    ann = standin.add_profile(SHOP, {"email": "a@example.com"})
    for order_id in ["1", "2", "3"]:
        put_order(standin, ann, order_id, int(order_id) * 10)

    filtered = api_get(
        standin, f"profile/{ann}/subprofiles/orders?fields[]=total%3E10"
    ).json()
    paged = api_get(standin, f"profile/{ann}/subprofiles/orders?start=1&limit=1")

    assert [item["fields"]["order_id"] for item in filtered["data"]] == ["2", "3"]
    page = paged.json()
    assert (page["start"], page["limit"], page["count"], page["total"]) == (1, 1, 1, 3)
    assert page["data"][0]["fields"]["order_id"] == "2"


def test_get_profile_subprofiles_rejects_unknown_profile_or_collection(standin):
    ann = standin.add_profile(SHOP, {"email": "a@example.com"})

    no_profile = api_get(standin, "profile/42/subprofiles/orders")
    no_collection = api_get(standin, f"profile/{ann}/subprofiles/returns")

    assert error_message(no_profile) == "No entity with supplied ID"
    assert error_message(no_collection) == "No collection with given ID"


# ------------------------------------------------------------ strict fields


@pytest.fixture
def strict():
    with CopernicaStandIn(
        access_token=TOKEN,
        databases={SHOP: SHOP_FIELDS},
        collections={SHOP: {"Orders": ORDER_FIELDS}},
        strict_fields=True,
    ) as running:
        yield running
        assert running.errors == []


def test_strict_fields_rejects_an_unknown_body_field_and_applies_nothing(strict):
    strict.add_profile(SHOP, {"email": "a@example.com"})

    response = put_profiles(
        strict,
        ["email==a@example.com"],
        {"firstname": "Ann", "Nickname": "Annie", "age": 3},
    )

    assert response.status_code == 400
    assert error_message(response) == UNKNOWN_FIELD_MESSAGE.format(name="Nickname")
    assert error_message(response) == "Unknown field: Nickname"
    assert strict.profiles(SHOP)[0]["fields"]["firstname"] == ""


def test_strict_fields_catches_a_v2_body_sent_to_v1(strict):
    response = put_profiles(
        strict, ["email==a@example.com"], {"fields": {"email": "a@example.com"}}
    )

    assert error_message(response) == "Unknown field: fields"
    assert strict.profiles(SHOP) == []


def test_strict_fields_checks_inside_fields_from_v2_on(strict):
    email = ["email==a@example.com"]
    good = put_profiles(strict, email, {"fields": {"EMAIL": "a@x.com"}}, version=2)
    bad = put_profiles(strict, email, {"fields": {"mail": "x"}}, version=3)

    assert good.status_code == 303
    assert bad.status_code == 400
    assert error_message(bad) == "Unknown field: mail"


def test_strict_fields_still_ignores_filters_on_unknown_fields(strict):
    strict.add_profile(SHOP, {"email": "a@example.com"})
    strict.add_profile(SHOP, {"email": "b@example.com"})

    response = put_profiles(strict, ["emial==a@example.com"], {"firstname": "Oops"})

    assert response.status_code == 303
    assert [p["fields"]["firstname"] for p in strict.profiles(SHOP)] == [
        "Oops",
        "Oops",
    ]
    assert strict.ignored_filters == ["emial==a@example.com"]


def test_strict_fields_applies_to_subprofile_put(strict):
    ann = strict.add_profile(SHOP, {"email": "a@example.com"})

    response = api_put(
        strict,
        f"profile/{ann}/subprofiles/orders?fields[]=order_id%3D%3D7&create=1",
        {"order_id": "7", "amount": 10},
    )

    assert error_message(response) == "Unknown field: amount"
    assert strict.subprofiles(ann, "orders") == []


def test_strict_fields_leaves_single_profile_put_lenient(strict):
    ann = strict.add_profile(SHOP, {"email": "a@example.com"})

    response = api_put(strict, f"profile/{ann}/fields", {"age": 5, "shoe": 42})

    assert response.status_code == 303
    assert strict.profiles(SHOP)[0]["fields"]["age"] == 5


# ------------------------------------------------------------------- load


def test_requests_to_filters_by_path_fragment_and_method(standin):
    ann = standin.add_profile(SHOP, {"email": "a@example.com"})
    api_get(standin, f"database/{SHOP}/fields")
    put_profiles(standin, ["email==a@example.com"], {})
    api_put(standin, f"profile/{ann}/fields", {})

    assert [r.path for r in standin.requests_to("/fields")] == [
        f"/v1/database/{SHOP}/fields",
        f"/v1/profile/{ann}/fields",
    ]
    assert [r.method for r in standin.requests_to("/fields", method="put")] == ["PUT"]
    assert standin.requests_to("/collection/") == []


def test_arrival_times_are_the_recorded_arrivals_in_order(standin):
    for _ in range(3):
        api_get(standin, f"database/{SHOP}/fields")

    times = standin.arrival_times()
    assert times == [record.received_at for record in standin.requests]
    assert times == sorted(times) and len(times) == 3
    assert times[-1] <= time.monotonic()


def test_a_client_that_waits_for_each_answer_has_peak_concurrency_one(standin):
    assert standin.peak_concurrency == 0

    for _ in range(5):
        api_get(standin, f"database/{SHOP}/fields")

    assert standin.peak_concurrency == 1


def run_in_threads(count, call):
    """Start ``count`` threads running ``call``; return them and their results."""
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(call())) for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads, results


def join_all(threads):
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)


def test_peak_concurrency_counts_hanging_requests_until_answered(standin):
    standin.add_fault(Fault(status=None, hang=True, times=3))
    threads, results = run_in_threads(
        3, lambda: api_get(standin, f"database/{SHOP}/fields").status_code
    )
    standin.wait_for_requests(3, timeout=TIMEOUT)

    assert standin.peak_concurrency == 3
    standin.release()
    join_all(threads)
    api_get(standin, f"database/{SHOP}/fields")

    assert results == [200, 200, 200]
    assert standin.peak_concurrency == 3
    standin.clear()
    assert standin.peak_concurrency == 0


def test_overload_above_concurrency_refuses_without_using_up_a_fault():
    with CopernicaStandIn(
        access_token=TOKEN, databases={SHOP: SHOP_FIELDS}, overload_above_concurrency=1
    ) as standin:
        standin.add_fault(Fault(status=None, hang=True))
        standin.add_fault(Fault(502))
        threads, results = run_in_threads(
            1, lambda: put_profiles(standin, ["email==a@x.com"], {}).status_code
        )
        standin.wait_for_requests(1, timeout=TIMEOUT)

        refused = put_profiles(standin, ["email==a@x.com"], {})
        standin.release()
        join_all(threads)
        after = put_profiles(standin, ["email==a@x.com"], {})

        assert refused.status_code == 503
        assert "Loadbalancer Error" in refused.text
        assert refused.headers["Content-Type"].startswith("text/html")
        assert (results, after.status_code) == ([303], 502)
        assert [request.status for request in standin.requests] == [303, 503, 502]
        assert standin.peak_concurrency == 2


def test_overload_above_rps_refuses_once_the_last_second_is_full():
    with CopernicaStandIn(
        access_token=TOKEN, databases={SHOP: SHOP_FIELDS}, overload_above_rps=2
    ) as standin:
        body = {"email": "a@x.com"}
        statuses = [
            put_profiles(standin, ["email==a@x.com"], body).status_code
            for _ in range(5)
        ]
        refused = standin.requests[-1]
        time.sleep(RATE_WINDOW_SECONDS + 0.05)
        later = put_profiles(standin, ["email==a@x.com"], body)

        assert statuses == [303, 303, 303, 503, 503]
        assert refused.status == 503
        assert later.status_code == 303
        assert len(standin.profiles(SHOP)) == 1


def test_overload_rules_leave_the_jwt_endpoint_alone():
    with CopernicaStandIn(
        access_token=TOKEN, databases={SHOP: SHOP_FIELDS}, overload_above_rps=0
    ) as standin:
        jwts = [fetch_jwt(standin) for _ in range(3)]
        first = put_profiles(
            standin,
            ["email==a@x.com"],
            {"fields": {"email": "a@x.com"}},
            version=4,
            token=None,
            headers={"Authorization": f"Bearer {jwts[-1]}"},
        )
        second = put_profiles(standin, ["email==a@x.com"], {})

    assert (first.status_code, second.status_code) == (201, 503)


@pytest.mark.parametrize(
    "kwargs", [{"overload_above_rps": -1}, {"overload_above_concurrency": 0}]
)
def test_overload_options_reject_nonsense(kwargs):
    with pytest.raises(ValueError):
        CopernicaStandIn(**kwargs)
