"""Building Copernica calls: selectors, flags and encoding, before any socket."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest

from worker.copernica import ApiV1, ApiV4, encode_query
from worker.mapping import ProfileUpdate


def update(**overrides) -> ProfileUpdate:
    values = {
        "rule": "r",
        "database": "1234",
        "selector": (("email", "a+b@example.com"),),
        "fields": {"email": "a+b@example.com", "firstname": "Zoë"},
        "create": True,
        "async_": False,
    }
    values.update(overrides)
    return ProfileUpdate(**values)


def put(u: ProfileUpdate, database: str = "1234", api=None):
    return (api or ApiV1()).profile_put(
        database, u.selector, u.fields, u.create, u.async_
    )


def test_v1_put_has_selector_flags_and_flat_body_without_token():
    call = put(update())

    assert call.method == "PUT"
    assert call.path == "/v1/database/1234/profiles"
    assert call.params == (
        ("fields[]", "email==a+b@example.com"),
        ("create", "1"),
        ("async", "0"),
    )
    assert call.body == {"email": "a+b@example.com", "firstname": "Zoë"}
    assert "access_token" not in call.target


def test_create_and_async_are_always_explicit():
    call = put(update(create=False, async_=True))
    assert ("create", "0") in call.params and ("async", "1") in call.params


def test_one_filter_per_key_field():
    call = put(update(selector=(("email", "a@example.com"), ("shop", "x"))))
    assert [v for n, v in call.params if n == "fields[]"] == [
        "email==a@example.com",
        "shop==x",
    ]


@pytest.mark.parametrize(
    "value, wire",
    [
        ("a+b@example.com", "a%2Bb%40example.com"),
        ("a&b", "a%26b"),
        ("a#b", "a%23b"),
        ("50%", "50%25"),
        ("x=y", "x%3Dy"),
        ("two words", "two%20words"),
        ("Zoë", "Zo%C3%AB"),
    ],
)
def test_selector_values_are_percent_encoded(value, wire):
    query = encode_query((("fields[]", f"email=={value}"),))
    assert query == f"fields%5B%5D=email%3D%3D{wire}"
    assert parse_qsl(query) == [("fields[]", f"email=={value}")]


def test_database_name_is_a_path_segment():
    call = put(update(), "shop db/1")
    assert call.path == "/v1/database/shop%20db%2F1/profiles"


def test_token_goes_only_into_the_sent_query():
    query, headers = ApiV1().credentials(put(update()), "t&k")
    assert query.endswith("&access_token=t%26k")
    assert headers == {}


def test_v4_put_wraps_fields_and_carries_a_bearer_not_a_query_token():
    call = put(update(), api=ApiV4())
    assert call.path == "/v4/database/1234/profiles"
    assert call.body == {"fields": {"email": "a+b@example.com", "firstname": "Zoë"}}
    query, headers = ApiV4().credentials(call, "jwt.value.sig")
    assert "access_token" not in query
    assert headers == {"Authorization": "Bearer jwt.value.sig"}


def test_subprofile_and_profile_calls_are_flat_in_every_version():
    for api in (ApiV1(), ApiV4()):
        call = api.subprofile_put("77", "orders", (("order_id", "5"),), {"total": "9"})
        assert call.path == f"/v{api.version}/profile/77/subprofiles/orders"
        assert call.params == (("fields[]", "order_id==5"), ("create", "1"))
        assert call.body == {"total": "9"}
        assert api.profile_fields_put("77", {"email": ""}).body == {"email": ""}
        assert api.profile_delete("77").method == "DELETE"
