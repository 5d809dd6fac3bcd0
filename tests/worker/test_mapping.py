"""Mapping rules: loading checks and what each rule makes of a body."""

from __future__ import annotations

import json

import pytest

from app.settings import BUNDLED_MAPPINGS
from tests.harness import FIXTURES
from worker.mapping import (
    MappedValueError,
    MappingError,
    ProfileUpdate,
    Skipped,
    apply_rules,
    load_mapping,
    parse_mapping,
)

ISSUE_EXAMPLE = """
rules:
  - source: shopify
    topics: [customers/create, customers/update]
    database: 1234
    key: [email]
    create: true
    async: false
    fields:
      email: email
      firstname: first_name
      lastname: last_name
  - source: typeform
    forms: [Xq3sK9Lm]
    topics: [form_response]
    key: [email]
    create: true
    fields:
      email: "form_response.answers[?field.ref=='email'] | [0].email"
"""


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_bytes())


def rules_from(text: str, database=None):
    import yaml

    return parse_mapping(yaml.safe_load(text), database)


def test_the_issue_example_with_plain_jmespath_works():
    rules = rules_from(ISSUE_EXAMPLE)
    [update] = apply_rules(
        rules, "typeform", "form_response", fixture("typeform/form_response.json")
    )
    assert update == ProfileUpdate(
        rule=update.rule,
        database=None,
        selector=(("email", "jose.nunez+newsletter@example.com"),),
        fields={"email": "jose.nunez+newsletter@example.com"},
        create=True,
        async_=False,
    )


def test_forms_filter_leaves_other_forms_alone():
    body = fixture("typeform/form_response.json")
    body["form_response"]["form_id"] = "Other"
    assert (
        apply_rules(rules_from(ISSUE_EXAMPLE), "typeform", "form_response", body) == []
    )


def test_bundled_mapping_loads_and_takes_the_default_database():
    rules = load_mapping(BUNDLED_MAPPINGS, "shop_db")
    assert {rule.database for rule in rules} == {"shop_db"}
    assert {t for rule in rules for t in rule.topics} >= {
        "customers/create",
        "customers/update",
        "orders/create",
        "orders/paid",
        "customers_email_marketing_consent/update",
        "form_response",
    }


def test_order_names_come_from_customer_not_shipping_address():
    rules = load_mapping(BUNDLED_MAPPINGS)
    order = fixture("shopify/orders_create.json")
    [update] = apply_rules(rules, "shopify", "orders/paid", order)
    assert update.fields["firstname"] == order["customer"]["first_name"]
    assert update.fields["lastname"] == order["customer"]["last_name"]
    assert order["shipping_address"]["last_name"] != update.fields["lastname"]


def test_null_and_missing_values_are_left_out_and_types_kept():
    rules = rules_from(ISSUE_EXAMPLE)
    body = {"email": "a@example.com", "first_name": None}
    [update] = apply_rules(rules, "shopify", "customers/create", body)
    assert update.fields == {"email": "a@example.com"}

    rules = rules_from(ISSUE_EXAMPLE.replace("lastname: last_name", "lastname: n"))
    [update] = apply_rules(
        rules,
        "shopify",
        "customers/create",
        {"email": "a@example.com", "n": 5, "first_name": True},
    )
    assert update.fields == {"email": "a@example.com", "firstname": True, "lastname": 5}


@pytest.mark.parametrize("email", [None, "", "   "])
def test_missing_or_empty_key_skips_the_rule(email):
    [outcome] = apply_rules(
        rules_from(ISSUE_EXAMPLE),
        "shopify",
        "customers/create",
        {"email": email, "first_name": "X"},
    )
    assert outcome == Skipped(outcome.rule, "key field 'email' is missing or empty")


def test_key_value_is_trimmed_in_selector_and_body_alike():
    [update] = apply_rules(
        rules_from(ISSUE_EXAMPLE),
        "shopify",
        "customers/create",
        {"email": " a@example.com "},
    )
    assert update.selector == (("email", "a@example.com"),)
    assert update.fields["email"] == "a@example.com"


def test_list_value_is_refused_naming_rule_and_field():
    rules = rules_from(
        ISSUE_EXAMPLE.replace("firstname: first_name", "firstname: tags")
    )
    with pytest.raises(MappedValueError, match="'firstname'"):
        apply_rules(
            rules,
            "shopify",
            "customers/create",
            {"email": "a@example.com", "tags": ["a"]},
        )


def test_unmatched_topic_gives_nothing():
    assert (
        apply_rules(
            rules_from(ISSUE_EXAMPLE),
            "shopify",
            "orders/create",
            {"email": "a@example.com"},
        )
        == []
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ("source: shopify", "source must be one of"),
        ("key: [email]", "key field(s) not in fields: phone"),
        ("email: email", "invalid expression"),
        ("email: email", "unknown function nosuch()"),
        ("create: true", "'create' must be true or false"),
        ("topics: [customers/create, customers/update]", "'topics' must be"),
        ("async: false", "unknown setting(s): asynk"),
    ],
)
def test_bad_rules_are_reported_with_the_rule_named(change, message):
    replacements = {
        "source must be one of": "source: magento",
        "key field(s) not in fields: phone": "key: [email, phone]",
        "invalid expression": 'email: "email["',
        "unknown function nosuch()": "email: nosuch(email)",
        "'create' must be true or false": "create: maybe",
        "'topics' must be": "topics: []",
        "unknown setting(s): asynk": "asynk: false",
        "answer() takes 2 argument(s), given 1": "lastname: answer(x)",
        "not_null() takes 1 or more argument(s), given 0": "firstname: not_null()",
    }
    text = ISSUE_EXAMPLE.replace(change, replacements[message], 1)
    with pytest.raises(MappingError) as raised:
        rules_from(text)
    assert "rule 1" in str(raised.value)
    assert message in str(raised.value)


def test_yaml_errors_and_missing_files_are_mapping_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [\n")
    with pytest.raises(MappingError, match="not valid YAML"):
        load_mapping(broken)
    with pytest.raises(MappingError, match="cannot read"):
        load_mapping(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(MappingError, match="top-level 'rules:' list"):
        load_mapping(empty)


@pytest.mark.parametrize(
    "email, reason",
    [
        ("\x00", "is missing or empty"),
        (" \x00\t", "is missing or empty"),
        ("zoe@example.com\x00x", "contains control characters"),
        ("a\nb@example.com", "contains control characters"),
        (True, "is a bool, not text or a number"),
        (1.5, "is not a whole number"),
        (float("nan"), "is not a whole number"),
    ],
)
def test_key_values_copernica_would_trim_or_misread_are_refused(email, reason):
    [outcome] = apply_rules(
        rules_from(ISSUE_EXAMPLE), "shopify", "customers/create", {"email": email}
    )
    assert outcome == Skipped(outcome.rule, f"key field 'email' {reason}")


def test_trailing_nul_is_trimmed_as_copernica_would():
    [update] = apply_rules(
        rules_from(ISSUE_EXAMPLE),
        "shopify",
        "customers/create",
        {"email": "zoe@example.com\x00"},
    )
    assert update.selector == (("email", "zoe@example.com"),)
    assert update.fields["email"] == "zoe@example.com"


def test_whole_number_keys_select_as_integers():
    rules = rules_from(
        ISSUE_EXAMPLE.replace("key: [email]", "key: [id]", 1).replace(
            "email: email", "email: email\n      id: id", 1
        )
    )
    [update] = apply_rules(rules, "shopify", "customers/create", {"id": 42.0})
    assert update.selector == (("id", "42"),)


def test_expression_type_error_names_rule_and_field_but_not_the_value():
    rules = load_mapping(BUNDLED_MAPPINGS)
    body = fixture("typeform/form_response.json")
    body["form_response"]["answers"] = {"email": "secret.person@example.com"}

    with pytest.raises(MappedValueError) as raised:
        apply_rules(rules, "typeform", "form_response", body)

    assert "typeform-response: field 'email'" in str(raised.value)
    assert "secret.person" not in str(raised.value)


def test_bundled_mapping_lowercases_the_email_domain_only():
    rules = load_mapping(BUNDLED_MAPPINGS)
    [update] = apply_rules(
        rules, "shopify", "customers/update", {"email": " Zoe.A+Shop@Example.COM "}
    )
    assert update.selector == (("email", "Zoe.A+Shop@example.com"),)
