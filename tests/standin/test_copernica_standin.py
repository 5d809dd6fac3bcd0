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

from tests.standin.copernica import CopernicaStandIn, Fault

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
