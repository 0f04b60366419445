"""Error bodies in each protocol's shape, and upstream refusals passed on readably."""

from __future__ import annotations

import json

import pytest

from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES, UpstreamRejected

OPENAI_BODY = {
    "error": {"message": "bad seed", "type": "invalid_request_error", "param": "seed", "code": None}
}
ANTHROPIC_BODY = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
JSON = "application/json"


@pytest.mark.parametrize(
    ("protocol", "body"),
    [(OPENAI_CHAT, OPENAI_BODY), (OPENAI_RESPONSES, OPENAI_BODY), (ANTHROPIC, ANTHROPIC_BODY)],
)
def test_a_refusal_in_the_clients_shape_is_passed_on_as_sent(protocol, body):
    content = json.dumps(body).encode() + b"\n"
    assert UpstreamRejected(400, content, JSON).body(protocol) == content


def test_an_openai_refusal_is_reshaped_for_an_anthropic_client():
    rejected = UpstreamRejected(404, json.dumps(OPENAI_BODY).encode(), JSON)
    assert json.loads(rejected.body(ANTHROPIC)) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "bad seed"},
    }


def test_an_anthropic_refusal_is_reshaped_for_an_openai_client():
    rejected = UpstreamRejected(403, json.dumps(ANTHROPIC_BODY).encode(), JSON)
    assert json.loads(rejected.body(OPENAI_CHAT)) == {
        "error": {
            "message": "bad",
            "type": "permission_error",
            "param": None,
            "code": "invalid_request_error",
        }
    }


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"<html>nope</html>", "text/html"), (b"not json", JSON), (b"[1]", JSON)],
)
def test_an_unreadable_refusal_is_quoted(content, content_type):
    body = json.loads(UpstreamRejected(400, content, content_type).body(OPENAI_CHAT))
    assert body["error"]["code"] == "unparseable_error"
    assert content.decode() in body["error"]["message"]


def test_a_foreign_refusal_without_a_message_is_quoted():
    rejected = UpstreamRejected(400, b'{"detail": "no"}', JSON)
    body = json.loads(rejected.body(ANTHROPIC))
    assert body["error"]["message"] == 'upstream answered 400: {"detail": "no"}'
