"""The X-NexusGate-ReqId header as NexusGate validates it, and the wait it suggests."""

from __future__ import annotations

import pytest

from gateway.dedup import in_flight, request_id, retry_after
from gateway.errors import ANTHROPIC, OPENAI_CHAT, InvalidRequest


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("   ", None),
        ("  job-42  ", "job-42"),
        ("a_b-c.d:e/f", "a_b-c.d:e/f"),
        ("x" * 127, "x" * 127),
    ],
)
def test_valid_ids_are_trimmed(raw: str | None, expected: str | None) -> None:
    assert request_id(raw) == expected


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("x" * 128, "reqid_too_long"),
        ("has space", "reqid_invalid_characters"),
        ("semi;colon", "reqid_invalid_characters"),
        ("ünïcode", "reqid_invalid_characters"),  # \w is ASCII in NexusGate's JavaScript
        ("a\nb", "reqid_invalid_characters"),
    ],
)
def test_malformed_ids_are_refused_with_nexusgates_codes(raw: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        request_id(raw)
    assert refused.value.status == 400 and refused.value.code == code
    assert refused.value.param == "X-NexusGate-ReqId"


def test_the_wait_assumes_a_minute_for_streams_and_half_for_the_rest() -> None:
    assert retry_after(stream=True, age=0) == 60
    assert retry_after(stream=False, age=0) == 30
    assert retry_after(stream=False, age=12.5) == 18
    assert retry_after(stream=True, age=600) == 1


def test_a_repeat_in_flight_is_a_409_in_the_callers_shape() -> None:
    error = in_flight("job-1", stream=False, age=10)
    assert (error.status, error.code, error.headers()) == (
        409,
        "request_in_flight",
        {"Retry-After": "20"},
    )
    assert b'"conflict"' in error.body(OPENAI_CHAT) and b'"type": "error"' in error.body(ANTHROPIC)
