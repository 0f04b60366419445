"""Fuzzing the public API: hostile bodies and headers on every /v1 route.

Hypothesis (fixed seed) mutates valid requests field by field and byte by byte
(``tests/fuzz_support.py``), nested known fields included. The properties, for every
case: no 5xx; a call the gateway refuses is neither sent upstream nor recorded; a call
that reached the upstream is recorded exactly once. First through Flask's test client
(thousands of cases, fast), then a shorter run through real gunicorn, which also must
not restart a worker. A third run puts a value of the wrong JSON type at one known
path of a body that uses every known field: it must be a 400 that names that path.
"""

from __future__ import annotations

import copy
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
from tests.test_proxy import CHAT, EMBEDDINGS, MESSAGES, RESPONSES, VALID, error_of, post, recorded

route = test_proxy.route  # the fixture: models fake and emb on the fake upstream, and a key

ROLES = st.sampled_from(["user", "assistant", "system", "tool", "developer", "function", "x"])


def shaped(required: dict[str, Any], **optional: Any) -> st.SearchStrategy:
    """An object of a known shape whose fields hold anything (``f.values`` if not given),
    or just anything: wrong types at every level of a nested known field."""
    fields = {key: f.values if value is None else value for key, value in optional.items()}
    return st.one_of(st.fixed_dictionaries(required, optional=fields), f.values)


def one_or_more(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(strategy, min_size=1, max_size=2), f.values)


PART_TYPES = ["text", "image_url", "image", "tool_result", "tool_use", "thinking", "input_text",
              "input_image", "function_call", "function_call_output", "reasoning", "message"]  # fmt: skip
part = shaped(
    {"type": st.one_of(st.sampled_from(PART_TYPES), f.values)},
    text=None, image_url=shaped({}, url=None, detail=None), source=shaped({}, type=None,
    media_type=None, data=None, url=None), cache_control=None, id=None, name=None, input=None,
    tool_use_id=None, content=None, is_error=None, thinking=None, signature=None, call_id=None,
    arguments=None, output=None, summary=None, role=ROLES, detail=None,
)  # fmt: skip
content = st.one_of(f.text, f.values, st.lists(part, max_size=3))
function = shaped({}, name=None, arguments=None, description=None, parameters=None, strict=None)
message = st.fixed_dictionaries(
    {"role": ROLES, "content": content},
    optional={
        "tool_calls": one_or_more(shaped({"id": f.values}, type=None, function=function)),
        "tool_call_id": f.values,
        "name": f.values,
        "reasoning_content": f.values,
    },
)
messages = st.one_of(st.lists(message, min_size=1, max_size=3), f.values)
model = st.one_of(st.just("fake"), st.just("fake@nowhere"), f.text, f.values)
tools = one_or_more(
    shaped({"type": f.values}, function=function, name=None, input_schema=None, parameters=None,
           cache_control=None, description=None, strict=None)
)  # fmt: skip
tool_choice = shaped({"type": f.values}, function=function, name=None,
                     disable_parallel_tool_use=None)  # fmt: skip
FIELDS: dict[str, dict[str, Any]] = {
    CHAT: {
        "model": model, "messages": messages, "stream": f.values, "temperature": f.values,
        "max_tokens": f.values, "tools": tools, "tool_choice": tool_choice,
        "stream_options": shaped({}, include_usage=None), "stop": f.values, "n": f.values,
        "response_format": shaped({"type": f.values}, json_schema=None), "seed": f.values,
        "logit_bias": shaped({}, **{"1": None}), "metadata": shaped({}, k=None),
    },
    MESSAGES: {
        "model": model, "messages": messages, "max_tokens": f.values, "system": f.values,
        "stream": f.values, "tools": tools, "tool_choice": tool_choice,
        "thinking": shaped({"type": st.one_of(st.sampled_from(["enabled", "adaptive"]), f.values)},
                           budget_tokens=None),
        "stop_sequences": one_or_more(f.values), "temperature": f.values, "top_k": f.values,
        "metadata": shaped({}, user_id=None),
    },
    RESPONSES: {
        "model": model, "input": st.one_of(f.text, messages, st.lists(part, max_size=3), f.values),
        "instructions": f.values, "max_output_tokens": f.values, "tools": tools,
        "tool_choice": tool_choice, "stream": f.values, "reasoning": shaped({}, effort=None, summary=None),
        "text": shaped({}, format=shaped({"type": f.values}), verbosity=None),
        "metadata": shaped({}, k=None), "include": one_or_more(f.values),
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


# -- a wrong type at a known path ------------------------------------------------------

STR, INT, NUM, BOOL, OBJ, ARR = "string", "integer", "number", "boolean", "object", "array"
PNG = "data:image/png;base64,iVBORw0KGgo="
# A body per route that uses every field the adapters know, nested ones included.
FULL: dict[str, dict[str, Any]] = {
    CHAT: {
        "model": "fake",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "name": "u", "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
            ]},
            {"role": "assistant", "content": "ok", "reasoning_content": "hm", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": False,
        }}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "stream": False, "stream_options": {"include_usage": True}, "max_tokens": 50,
        "max_completion_tokens": 50, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
        "stop": ["x"], "parallel_tool_calls": True, "reasoning_effort": "low", "n": 1,
        "response_format": {"type": "text"}, "seed": 1, "user": "u", "logprobs": False,
        "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0,
        "logit_bias": {"1": 0}, "metadata": {"k": "v"}, "store": False,
    },
    MESSAGES: {
        "model": "fake",
        "max_tokens": 50,
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
                {"type": "image", "source": {
                    "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo=",
                }},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "r", "is_error": False},
            ]},
        ],
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"},
                   "cache_control": {"type": "ephemeral"}}],
        "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
        "stream": False, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop_sequences": ["x"],
        "thinking": {"type": "enabled", "budget_tokens": 1024}, "metadata": {"user_id": "u"},
    },
    RESPONSES: {
        "model": "fake",
        "instructions": "be brief",
        "input": [
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "hi"},
                {"type": "input_image", "image_url": PNG, "detail": "low"},
            ]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "r"},
        ],
        "tools": [{"type": "function", "name": "f", "description": "d",
                   "parameters": {"type": "object"}, "strict": False}],
        "tool_choice": {"type": "function", "name": "f"},
        "stream": False, "max_output_tokens": 50, "temperature": 0.5, "top_p": 0.9,
        "parallel_tool_calls": True, "reasoning": {"effort": "low", "summary": "auto"},
        "text": {"format": {"type": "text"}, "verbosity": "low"}, "metadata": {"k": "v"},
        "store": False, "include": ["reasoning.encrypted_content"], "top_logprobs": 0,
        "max_tool_calls": 3, "previous_response_id": "resp_1", "user": "u",
    },
}  # fmt: skip


def _types(body: Any, path: tuple = ()) -> dict[tuple, set[str]]:
    """Every path in ``body`` with the JSON type its value has there: what it must have."""
    kind = _json_type(body)
    found = {path: {kind}} if path else {}
    children = body.items() if kind == OBJ else enumerate(body) if kind == ARR else ()
    for key, value in children:
        found.update(_types(value, (*path, key)))
    return found


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return BOOL
    return {int: INT, float: NUM, str: STR, list: ARR, dict: OBJ}[type(value)]


# Paths that take more than the type their value in FULL has (a number takes integers).
UNIONS: dict[str, dict[tuple, set[str]]] = {
    CHAT: {
        ("messages", 0, "content"): {STR, ARR}, ("messages", 1, "content"): {STR, ARR},
        ("messages", 2, "content"): {STR, ARR}, ("messages", 3, "content"): {STR, ARR},
        ("stop",): {STR, ARR}, ("tool_choice",): {STR, OBJ}, ("presence_penalty",): {NUM},
        ("frequency_penalty",): {NUM}, ("logit_bias", "1"): {NUM},
    },
    MESSAGES: {
        ("system",): {STR, ARR}, ("messages", 0, "content"): {STR, ARR},
        ("messages", 1, "content"): {STR, ARR}, ("messages", 2, "content"): {STR, ARR},
        ("messages", 2, "content", 0, "content"): {STR, ARR},
    },
    RESPONSES: {
        ("input",): {STR, ARR}, ("input", 0, "content"): {STR, ARR},
        ("input", 2, "output"): {STR, ARR}, ("input", 0, "content", 1, "image_url"): {STR, OBJ},
        ("tool_choice",): {STR, OBJ},
    },
}  # fmt: skip
# Values passed on whole, whatever they hold: a tool's schema, a tool call's input.
OPAQUE = {"parameters", "input_schema", "cache_control"}
KNOWN = {
    route: {
        path: UNIONS[route].get(path, kinds)
        for path, kinds in _types(body).items()
        if not OPAQUE & set(path[:-1]) and not (route == MESSAGES and "input" in path[:-1])
    }
    for route, body in FULL.items()
}


def _name(path: tuple) -> str:
    """A path as the gateway's errors name it: ``messages[2].tool_calls[0].id``."""
    return "".join(
        f"[{key}]" if isinstance(key, int) else f".{key}" if i else key
        for i, key in enumerate(path)
    )


def _allowed(route: str, path: tuple) -> set[str]:
    kinds = KNOWN[route][path]
    return kinds | {INT} if NUM in kinds else kinds


# A value of each JSON type, falsy ones too (a check written as ``if value:`` lets them by).
WRONG = [0, -1, 1.5, True, False, "", "x", [], [1], {}, {"a": 1}]


@st.composite
def wrong_types(draw: Any) -> tuple[str, tuple, Any]:
    route = draw(st.sampled_from(sorted(FULL)))
    path = draw(st.sampled_from(sorted(KNOWN[route], key=repr)))
    allowed = _allowed(route, path)
    value = draw(f.values.filter(lambda v: v is not None and _json_type(v) not in allowed))
    return route, path, value


def test_every_known_field_of_the_full_bodies_reaches_the_upstream(client, fake, route) -> None:  # type: ignore[no-untyped-def]
    for path, body in FULL.items():
        resp = post(client, path, body, route["key"])
        assert resp.status_code == 200, (path, resp.get_data()[:300])
    assert len(fake.log(route["id"])) == len(FULL) and recorded() == len(FULL)


def test_a_wrong_type_at_a_known_path_is_a_400_naming_it(client, fake, route) -> None:  # type: ignore[no-untyped-def]
    # Every known path with a value of every other JSON type, then hypothesis's values.
    markers: list[str] = []

    def one(where: str, path: tuple, value: Any) -> None:
        body = copy.deepcopy(FULL[where])
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        markers.append(uuid.uuid4().hex)
        resp = post(client, where, body, route["key"], **{"X-Fake-Script": f"id={markers[-1]}"})
        assert resp.status_code == 400, (where, _name(path), value, resp.get_data()[:300])
        _, message, param = error_of(resp, where)
        names = {_name(path[:i]) for i in range(1, len(path) + 1)}  # the path or one around it
        said = param if where != MESSAGES else message.split(" ", 1)[0]
        assert said in names, (where, _name(path), value, message)

    for where, paths in KNOWN.items():
        for path in paths:
            for value in WRONG:
                if _json_type(value) not in _allowed(where, path):
                    one(where, path, value)
    f.run(given(wrong_types())(lambda case: one(*case)), f.EXAMPLES_FAST // 3)
    sent = {entry["id"] for entry in fake.log()}
    assert not sent & set(markers) and recorded() == 0
