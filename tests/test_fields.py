"""Admin fields checked against what the columns hold: pure units of the rules."""

from __future__ import annotations

from datetime import datetime

import pytest

from gateway.fields import INT32, Invalid, Spec, check

SPEC = {
    "name": Spec(str, required=True, null=False, low=1, high=8),
    "note": Spec(str, high=20, line=False),
    "kind": Spec(str, null=False, choices=("a", "b")),
    "count": Spec(int, null=False, low=1),
    "price": Spec(float, high=1e6),
    "flag": Spec(bool, null=False),
    "when": Spec(datetime),
}


def test_fields_come_out_snake_cased_and_unknown_ones_are_ignored() -> None:
    body = {"name": "x", "note": "a\nb", "count": 3, "price": 2, "flag": False, "extra": 1}
    assert check(body, SPEC) == {
        "name": "x",
        "note": "a\nb",
        "count": 3,
        "price": 2.0,
        "flag": False,
    }
    assert check({"note": None, "when": "2030-01-02T03:04:05+08:00"}, SPEC, required=False) == {
        "note": None,
        "when": datetime(2030, 1, 1, 19, 4, 5),
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "name is required"),
        ({"name": None}, "name is required"),
        ({"name": "x", "count": None}, "count must not be null"),
        ({"name": "x", "flag": None}, "flag must not be null"),
        ({"name": ""}, "name must be 1 to 8 characters"),
        ({"name": "x" * 9}, "name must be 1 to 8 characters"),
        ({"name": 5}, "name must be a string"),
        ({"name": "a\tb"}, "name must not contain control characters"),
        ({"name": "x", "note": "a\x00b"}, "note must not contain control characters"),
        ({"name": "x", "kind": "c"}, "kind must be one of a, b"),
        ({"name": "x", "count": 0}, "count must be at least 1"),
        ({"name": "x", "count": INT32 + 1}, f"count must be at most {INT32}"),
        ({"name": "x", "count": 10**400}, f"count must be at most {INT32}"),
        ({"name": "x", "count": 1.5}, "count must be an integer"),
        ({"name": "x", "count": 2.0}, "count must be an integer"),
        ({"name": "x", "count": True}, "count must be an integer"),
        ({"name": "x", "count": "3"}, "count must be an integer"),
        ({"name": "x", "price": float("inf")}, "price must be a number"),
        ({"name": "x", "price": float("nan")}, "price must be a number"),
        ({"name": "x", "price": -0.5}, "price must be at least 0"),
        ({"name": "x", "price": 1e7}, "price must be at most 1000000"),
        ({"name": "x", "price": 10**400}, "price must be at most 1000000"),
        ({"name": "x", "flag": "yes"}, "flag must be true or false"),
        ({"name": "x", "when": "tomorrow"}, "when must be an ISO 8601 date-time"),
        ({"name": "x", "when": 20300101}, "when must be an ISO 8601 date-time"),
        ({"name": "x", "when": "0001-01-01T00:00:00+01:00"}, "when must be an ISO 8601"),
        ({"name": "x", "when": "1900-01-01"}, "between the years 1970 and 9999"),
        ({"name": "x", "when": "\uff12\uff10\uff13\uff10-01-01"}, "ISO 8601"),
    ],
)
def test_what_a_column_cannot_hold_is_refused_naming_the_field(body: dict, message: str) -> None:
    with pytest.raises(Invalid) as caught:
        check(body, SPEC)
    assert str(caught.value) == message or message in str(caught.value)


def test_a_partial_update_may_leave_required_fields_out_but_not_null_them() -> None:
    assert check({}, SPEC, required=False) == {}
    with pytest.raises(Invalid, match="name is required"):
        check({"name": None}, SPEC, required=False)
