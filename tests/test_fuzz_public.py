"""Fuzzing the public API: hostile bodies and headers on every /v1 route.

Hypothesis (fixed seed) mutates valid requests field by field and byte by byte
(``tests/fuzz_support.py``). The properties, for every case: no 5xx; a call the
gateway refuses is neither sent upstream nor recorded; a call that reached the
upstream is recorded exactly once. First through Flask's test client (thousands
of cases, fast), then a shorter run through real gunicorn, which also must not
restart a worker.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from tests import fuzz_support as f
from tests import test_proxy
from tests.servers import Gateway, wait_until
from tests.test_proxy import CHAT, EMBEDDINGS, MESSAGES, RESPONSES, VALID, recorded

route = test_proxy.route  # the fixture: models fake and emb on the fake upstream, and a key

ROLES = st.sampled_from(["user", "assistant", "system", "tool", "developer", "function", "x"])
content = st.one_of(
    f.text,
    f.values,
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", "image", "tool_result", "input_text"])},
            optional={"text": f.values, "image_url": f.values, "source": f.values},
        ),
        max_size=3,
    ),
)
message = st.fixed_dictionaries(
    {"role": ROLES, "content": content},
    optional={"tool_calls": f.values, "tool_call_id": f.values, "name": f.values},
)
messages = st.one_of(st.lists(message, min_size=1, max_size=3), f.values)
model = st.one_of(st.just("fake"), st.just("fake@nowhere"), f.text, f.values)
FIELDS: dict[str, dict[str, Any]] = {
    CHAT: {
        "model": model, "messages": messages, "stream": f.values, "temperature": f.values,
        "max_tokens": f.values, "tools": f.values, "tool_choice": f.values,
        "stream_options": f.values, "stop": f.values, "n": f.values, "response_format": f.values,
    },
    MESSAGES: {
        "model": model, "messages": messages, "max_tokens": f.values, "system": f.values,
        "stream": f.values, "thinking": f.values, "tools": f.values, "tool_choice": f.values,
        "stop_sequences": f.values, "temperature": f.values, "top_k": f.values,
    },
    RESPONSES: {
        "model": model, "input": st.one_of(f.text, messages, f.values),
        "instructions": f.values, "max_output_tokens": f.values, "tools": f.values,
        "tool_choice": f.values, "stream": f.values, "reasoning": f.values,
    },
    EMBEDDINGS: {
        "model": st.one_of(st.just("emb"), f.text, f.values),
        "input": st.one_of(f.text, st.lists(f.text, max_size=3), f.values),
        "dimensions": f.values, "encoding_format": f.values, "user": f.values,
    },
}  # fmt: skip


def _unrepeated(headers: dict[str, str], marker: str) -> dict[str, str]:
    """A drawn request id made this case's own: a repeat would be answered by a replay
    (tests/test_replay.py), not by the upstream these properties count on."""
    if "x-nexusgate-reqid" in headers:
        headers = {**headers, "x-nexusgate-reqid": headers["x-nexusgate-reqid"] + marker}
    return headers


@st.composite
def requests_(draw: Any) -> tuple[str, bytes, dict[str, str]]:
    path = draw(st.sampled_from(sorted(VALID)))
    return path, draw(f.body_bytes(VALID[path], FIELDS[path])), draw(f.headers)


def test_fuzz_the_public_api_through_the_test_client(client, fake, route) -> None:  # type: ignore[no-untyped-def]
    cases: list[tuple[str, int, int]] = []  # (marker, status, records it added)
    rows = [recorded()]

    @given(requests_())
    def one(case: tuple[str, bytes, dict[str, str]]) -> None:
        path, raw, headers = case
        marker = uuid.uuid4().hex  # names this case in the fake's log (the header wins)
        headers = {
            **_unrepeated(headers, marker),
            "Authorization": f"Bearer {route['key']}",
            "X-Fake-Script": f"id={marker}",
        }
        resp = client.post(path, data=raw, headers=headers, content_type="application/json")
        resp.get_data()  # a stream runs to its end
        assert resp.status_code < 500, (resp.status_code, resp.get_data()[:300])
        if not f.json_text(raw):
            assert resp.status_code == 400, "not JSON text: refused, whatever else is wrong"
        rows.append(recorded())
        cases.append((marker, resp.status_code, rows[-1] - rows[-2]))

    f.run(one, f.EXAMPLES_FAST)
    sent = Counter(entry["id"] for entry in fake.log())
    for marker, status, added in cases:
        assert sent[marker] <= 1, "one call, one upstream request (the fake never fails)"
        assert added == sent[marker], "recorded exactly when the upstream was asked"
        assert status != 200 or sent[marker] == 1
    # The fuzzer reached the upstream as well as the refusals: both paths were tried.
    statuses = Counter(status for _, status, _ in cases)
    assert min(statuses[200], statuses[400]) > f.EXAMPLES_FAST // 20, statuses


@pytest.mark.server
def test_fuzz_the_public_api_through_gunicorn(gateway: Gateway, fake) -> None:  # type: ignore[no-untyped-def]
    setup = gateway.setup_route(
        fake.url, remote_id="fake", key={"rpmLimit": 10**9, "tpmLimit": 10**9}
    )
    gateway.api(
        "POST",
        "/models",
        json={
            "providerId": setup["provider"]["id"],
            "systemName": "emb",
            "remoteId": "emb",
            "modelType": "embedding",
        },
    )
    session = requests.Session()
    cases: list[tuple[str, int]] = []

    @given(requests_())
    def one(case: tuple[str, bytes, dict[str, str]]) -> None:
        path, raw, headers = case
        marker = uuid.uuid4().hex
        headers = {
            **_unrepeated(headers, marker),
            "Authorization": f"Bearer {setup['key']}",
            "X-Fake-Script": f"id={marker}",
        }
        headers["Content-Type"] = "application/json"
        resp = session.post(gateway.url + path, data=raw, headers=headers, timeout=30)
        assert resp.status_code < 500, (resp.status_code, resp.text[:300])
        if not f.json_text(raw):
            assert resp.status_code == 400, "not JSON text: refused, whatever else is wrong"
        cases.append((marker, resp.status_code))

    f.run(one, f.EXAMPLES_SERVER)
    sent = Counter(entry["id"] for entry in fake.log())
    for marker, status in cases:
        assert sent[marker] <= 1 and (status != 200 or sent[marker] == 1), (marker, status)
    calls = sum(sent[marker] for marker, _ in cases)
    assert calls > 0, Counter(status for _, status in cases)  # the accepted path was tried

    def final() -> list[dict] | None:
        rows = gateway.records("completions") + gateway.records("embeddings")
        return rows if len(rows) >= calls and all(r["status"] != "pending" for r in rows) else None

    rows = wait_until(final, timeout=30)
    assert len(rows) == calls, "every call that reached the upstream, recorded once; no other"
    assert len({r["uid"] for r in rows}) == len(rows)
    assert gateway.log().count("Booting worker") == 1, "a worker restarted"
    assert "Traceback" not in gateway.log()
