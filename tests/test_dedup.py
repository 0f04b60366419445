"""The X-NexusGate-ReqId header as NexusGate validates it, the wait it suggests, its 409."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway.dedup import in_flight, iso_utc, request_id, retry_after
from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES, InvalidRequest, error_body


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


STARTED = 1773480413.5897  # 2026-03-14 09:26:53.5897 UTC


def test_a_repeat_in_flight_is_a_409_with_nexusgates_fields_in_the_openai_shape() -> None:
    error = in_flight("job-1", stream=False, age=10, started=STARTED)
    assert (error.status, error.code, error.headers()) == (
        409,
        "request_in_flight",
        {"Retry-After": "20"},
    )
    message = (
        "A request with X-NexusGate-ReqId 'job-1' is still in flight; retry when it has finished"
    )
    shaped = {
        "error": {
            "message": message,
            "type": "conflict",
            "param": None,
            "code": "request_in_flight",
            "req_id": "job-1",
            "retry_after": 20,  # the Retry-After header's, as a number
            "started_at": "2026-03-14T09:26:53.589Z",  # as JavaScript's toISOString()
        }
    }
    assert json.loads(error.body(OPENAI_CHAT)) == shaped
    assert json.loads(error.body(OPENAI_RESPONSES)) == {"object": "error", **shaped}


def test_a_repeat_in_flight_is_a_409_with_nexusgates_fields_in_the_anthropic_shape() -> None:
    error = in_flight("job-1", stream=True, age=0.5, started=STARTED)
    assert json.loads(error.body(ANTHROPIC)) == {
        "type": "error",
        "error": {
            "type": "conflict",
            "message": "A request with X-NexusGate-ReqId 'job-1' is still in flight;"
            " retry when it has finished",
            "req_id": "job-1",
            "retry_after": 60,
            "started_at": "2026-03-14T09:26:53.589Z",
        },
    }


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1773480413, "2026-03-14T09:26:53.000Z"),
        (1773480413.999999, "2026-03-14T09:26:53.999Z"),  # cut, as JavaScript keeps whole ms
    ],
)
def test_started_at_is_iso_8601_utc_with_milliseconds(epoch: float, expected: str) -> None:
    assert iso_utc(epoch) == expected
    assert datetime.fromisoformat(expected.replace("Z", "+00:00")).tzinfo == UTC


def test_details_never_replace_a_protocols_own_fields() -> None:
    body = error_body(OPENAI_CHAT, "conflict", "m", "c", details={"type": "x", "extra": 1})
    assert body == {
        "error": {"message": "m", "type": "conflict", "param": None, "code": "c", "extra": 1}
    }
    body = error_body(ANTHROPIC, "conflict", "m", details={"message": "x", "extra": 1})
    assert body == {"type": "error", "error": {"type": "conflict", "message": "m", "extra": 1}}
