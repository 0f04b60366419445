"""A finished call's account (``account.py``): literal answers in, the record's fields out."""

from __future__ import annotations

import dataclasses

from gateway import account, pricing
from tests.test_plan import candidate

PRICED = dataclasses.replace(candidate(), input_price=2.5, output_price=10.0, cache_read_price=1.25)
USAGE = {"input_tokens": 1000, "output_tokens": 200, "cache_read_tokens": 400}


def test_a_priced_candidate_costs_the_usage_at_its_prices_once() -> None:
    got = account.priced({"id": "chatcmpl-1"}, USAGE, PRICED)
    expected = pricing.cost(USAGE, pricing.Prices(2.5, 10.0, 1.25, None))
    assert got == {"cost": expected, "upstream_id": "chatcmpl-1"}
    assert got["cost"] is not None


def test_unknown_prices_or_usage_cost_null_never_zero() -> None:
    unpriced = dataclasses.replace(PRICED, input_price=None)
    assert account.priced({"id": "x"}, USAGE, unpriced)["cost"] is None
    assert account.priced({"id": "x"}, None, PRICED)["cost"] is None
    assert account.priced(None, USAGE, None) == {"cost": None, "upstream_id": None}


def test_the_providers_id_is_kept_only_as_printable_text() -> None:
    assert account.priced({"id": "a\nb"}, None, None)["upstream_id"] is None
    assert account.priced({"id": 42}, None, None)["upstream_id"] is None
    assert account.priced({"id": "r" * 300}, None, None)["upstream_id"] == "r" * 255


def test_a_streams_delivery_is_the_text_its_client_was_sent() -> None:
    response = {
        "content": [
            {"type": "text", "text": "Hello, "},
            {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
            {"type": "text", "text": "world"},
        ]
    }
    assert account.delivered(response, 3, 9) == {"events": 3, "text": "Hello, wo"}
    assert account.delivered(response, 5, 100) == {"events": 5, "text": "Hello, world"}
    assert account.delivered(None, 0, 0) == {"events": 0, "text": ""}
