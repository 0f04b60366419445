"""The public views over HTTP (Flask's test client, the fake upstream behind it).

Every refusal comes back in the caller's protocol shape naming what is wrong, and a
refused call is neither sent upstream nor recorded. The first test shows that the same
setup does reach the upstream and the tables, so "nothing happened" can fail.
"""

from __future__ import annotations

import gc
import json
import socket
import uuid

import gevent
import peewee
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import EnvironHeaders

from gateway import auth, client_headers, proxy, redact
from gateway.adapters.translator import StreamTranslator
from gateway.db import database
from gateway.models import Completion, Embedding
from gateway.recorder import recorder
from tests.servers import ADMIN_SECRET

ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
CHAT, MESSAGES, RESPONSES, EMBEDDINGS = (
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/responses",
    "/v1/embeddings",
)
VALID = {
    CHAT: {"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
    MESSAGES: {"model": "fake", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]},
    RESPONSES: {"model": "fake", "input": "hi"},
    EMBEDDINGS: {"model": "emb", "input": "hi"},
}


@pytest.fixture
def route(client, fake) -> dict:  # type: ignore[no-untyped-def]
    """Chat model ``fake`` and embedding model ``emb`` on the fake upstream, and a key."""
    call_id = uuid.uuid4().hex
    provider = client.post(
        "/api/admin/providers",
        json={"name": "fake", "type": "openai", "baseUrl": f"{fake.url}/v1"},
        headers=ADMIN,
    ).get_json()
    for name, model_type in (("fake", "chat"), ("emb", "embedding")):
        model = {"systemName": name, "remoteId": f"{name};id={call_id}", "modelType": model_type}
        client.post(
            "/api/admin/models", json={"providerId": provider["id"], **model}, headers=ADMIN
        )
    # Limits no test reaches (the public fuzzer makes thousands of calls with this key).
    limits = {"rpmLimit": 10**9, "tpmLimit": 10**9}
    key = client.post("/api/admin/apiKey", json=limits, headers=ADMIN).get_json()["key"]
    return {"key": key, "id": call_id}


def post(client, path: str, body: object, key: str | None, **headers: str):  # type: ignore[no-untyped-def]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    # Buffered: the body is read and closed, as a server does (a JSON call's tokens are
    # charged once its answer is written, when the server closes it).
    return client.post(
        path, data=data, headers=headers, content_type="application/json", buffered=True
    )


def recorded() -> int:
    assert recorder.flush(5)
    with database.connection_context():
        return Completion.select().count() + Embedding.select().count()


def error_of(resp, path: str) -> tuple[str, str, str | None]:  # type: ignore[no-untyped-def]
    """(type, message, param) of an error body, checking its protocol shape on the way."""
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    if path == MESSAGES:
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
        return body["error"]["type"], body["error"]["message"], None
    # Responses errors say ``object: "error"`` beside it, as NexusGate's do.
    assert set(body) == ({"object", "error"} if path == RESPONSES else {"error"})
    assert set(body["error"]) == {"message", "type", "code", "param"}
    return body["error"]["type"], body["error"]["message"], body["error"]["param"]


@pytest.mark.parametrize("path", VALID)
def test_the_same_setup_reaches_the_upstream_and_is_recorded(client, fake, route, path) -> None:  # type: ignore[no-untyped-def]
    resp = post(client, path, VALID[path], route["key"])
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    assert len(fake.log(route["id"])) == 1
    assert recorded() == 1


def test_a_finished_call_leaves_no_cycle_for_the_garbage_collector(client, route) -> None:  # type: ignore[no-untyped-def]
    """A call's objects go as soon as nobody holds them; left in reference cycles they
    wait for the collector, whose passes then cost every call of the worker (issue 11).
    Both shapes a call takes are checked: a JSON answer and a stream, read whole."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection frees is kept in gc.garbage
    try:
        for body in (VALID[CHAT], {**VALID[CHAT], "stream": True}):
            resp = post(client, CHAT, body, route["key"])
            assert resp.status_code == 200 and resp.get_data()
            resp.close()
        assert recorded() == 2
        gc.collect()
        left = sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    ours = {"CallRequest", "Call", "Downstream", "Exchange", "Plan", "Ending", "Admission"}
    assert not ours & set(left), f"in reference cycles: {left}"


def _cases() -> list:
    def case(path: str, body: object, param: str | None, message: str, name: str):
        return pytest.param(path, body, param, message, id=f"{path.rsplit('/', 1)[1]}-{name}")

    cases = []
    for path, valid in VALID.items():
        without_model = {k: v for k, v in valid.items() if k != "model"}
        cases += [
            case(path, b'{"model": "fake", ', None, "not valid JSON", "malformed-json"),
            case(path, b"\xff\xfe", None, "not valid JSON", "not-utf8"),
            case(path, [valid], None, "must be a JSON object", "array-body"),
            case(path, "hi", None, "must be a JSON object", "string-body"),
            case(path, without_model, "model", "model is required", "no-model"),
            case(path, {**valid, "model": ["fake"]}, "model", "model must be", "model-not-string"),
        ]
    cases += [
        case(CHAT, {"model": "fake"}, "messages", "messages is required", "no-messages"),
        case(CHAT, {**VALID[CHAT], "messages": []}, "messages", "must not be empty", "empty"),
        case(CHAT, {**VALID[CHAT], "messages": "hi"}, "messages", "an array", "messages-str"),
        case(CHAT, {**VALID[CHAT], "messages": [{"role": "boss", "content": "x"}]},
             "messages[0].role", "messages[0].role must be one of", "bad-role"),
        case(CHAT, {**VALID[CHAT], "messages": [{"role": "user"}]},
             "messages[0].content", "messages[0].content is required", "no-content"),
        case(CHAT, {**VALID[CHAT], "temperature": "hot"}, "temperature", "a number", "temp"),
        case(CHAT, {**VALID[CHAT], "stream": "yes"}, "stream", "a boolean", "stream-str"),
        case(CHAT, {**VALID[CHAT], "tools": [{"type": "function"}]},
             "tools[0].function", "tools[0].function is required", "tool-no-function"),
        case(MESSAGES, {"model": "fake", "max_tokens": 9}, "messages", "is required", "no-msgs"),
        case(MESSAGES, {**VALID[MESSAGES], "messages": []}, "messages", "not be empty", "empty"),
        case(MESSAGES, {**VALID[MESSAGES], "max_tokens": None}, "max_tokens", "max_tokens is required", "no-max-tokens"),
        case(MESSAGES, {**VALID[MESSAGES], "max_tokens": "9"}, "max_tokens", "an integer", "max-str"),
        case(MESSAGES, {**VALID[MESSAGES], "messages": [{"role": "user", "content": 5}]},
             "messages[0].content", "messages[0].content must be", "content-int"),
        case(MESSAGES, {**VALID[MESSAGES], "system": 5}, "system", "system must be", "system-int"),
        case(RESPONSES, {"model": "fake"}, "input", "input is required", "no-input"),
        case(RESPONSES, {"model": "fake", "input": ""}, "input", "must not be empty", "empty-str"),
        case(RESPONSES, {"model": "fake", "input": []}, "input", "must not be empty", "empty-list"),
        case(RESPONSES, {"model": "fake", "input": 5}, "input", "a string or an array", "input-int"),
        case(RESPONSES, {"model": "fake", "input": ["hi"]}, "input[0]", "an object", "item-str"),
        case(RESPONSES, {**VALID[RESPONSES], "max_output_tokens": 1.5},
             "max_output_tokens", "an integer", "max-float"),
        # Known fields with a wrong type or out of range (issue 7, defect 11): each
        # passed validation and was forwarded with a 200.
        case(CHAT, {**VALID[CHAT], "max_tokens": -5}, "max_tokens", "from 0 to", "max-negative"),
        case(CHAT, b'{"model": "fake", "max_tokens": 1000000000000000000000000000000, '
             b'"messages": [{"role": "user", "content": "hi"}]}', "max_tokens", "from 0 to", "max-huge"),
        case(CHAT, {**VALID[CHAT], "n": "2"}, "n", "n must be an integer", "n-str"),
        case(CHAT, {**VALID[CHAT], "response_format": 7}, "response_format", "an object", "format-int"),
        case(CHAT, {**VALID[CHAT], "messages": [{"role": "user", "content": "hi", "name": 7}]},
             "messages[0].name", "messages[0].name must be a string", "name-int"),
        case(MESSAGES, {**VALID[MESSAGES], "thinking": {"type": 7}}, "thinking.type", "thinking.type must be a string", "thinking-type"),
        case(MESSAGES, {**VALID[MESSAGES], "stop_sequences": "x"}, "stop_sequences", "must be an array", "stop-str"),
        case(MESSAGES, {**VALID[MESSAGES], "metadata": "x"}, "metadata", "metadata must be an object", "metadata-str"),
        case(MESSAGES, {**VALID[MESSAGES], "max_tokens": -1}, "max_tokens", "from 0 to", "max-negative"),
        case(MESSAGES, b'{"model": "fake", "max_tokens": 1000000000000000000000000000000, '
             b'"messages": [{"role": "user", "content": "hi"}]}', "max_tokens", "from 0 to", "max-huge"),
        case(RESPONSES, {**VALID[RESPONSES], "text": "x"}, "text", "text must be an object", "text-str"),
        case(RESPONSES, {**VALID[RESPONSES], "max_output_tokens": -1}, "max_output_tokens", "from 0 to", "max-negative"),
        case(EMBEDDINGS, {"model": "emb"}, "input", "input is required", "no-input"),
        case(EMBEDDINGS, {"model": "emb", "input": ""}, "input", "non-empty", "empty-str"),
        case(EMBEDDINGS, {"model": "emb", "input": []}, "input", "non-empty", "empty-list"),
        case(EMBEDDINGS, {"model": "emb", "input": {"text": "hi"}}, "input", "input must be", "input-obj"),
        case(EMBEDDINGS, {**VALID[EMBEDDINGS], "dimensions": "8"}, "dimensions", "an integer", "dims-str"),
        case(EMBEDDINGS, {**VALID[EMBEDDINGS], "encoding_format": "hex"},
             "encoding_format", "encoding_format must be one of", "encoding"),
    ]  # fmt: skip
    return cases


@pytest.mark.parametrize(("path", "body", "param", "message"), _cases())
def test_invalid_requests_get_400_naming_the_field(
    client, fake, route, path, body, param, message
) -> None:  # type: ignore[no-untyped-def]
    resp = post(client, path, body, route["key"])
    assert resp.status_code == 400
    kind, text, named = error_of(resp, path)
    assert kind == "invalid_request_error"
    assert message in text
    if path != MESSAGES:  # Anthropic's error shape has no param; the message names it
        assert named == param
    assert fake.log(route["id"]) == [] and recorded() == 0


@pytest.mark.parametrize("path", VALID)
def test_unknown_model_gets_404(client, fake, route, path) -> None:  # type: ignore[no-untyped-def]
    for model in ("nope", "fake@elsewhere" if path != EMBEDDINGS else "emb@elsewhere"):
        resp = post(client, path, {**VALID[path], "model": model}, route["key"])
        assert resp.status_code == 404, model
        kind, text, _ = error_of(resp, path)
        assert kind == ("not_found_error" if path == MESSAGES else "invalid_request_error")
        assert "not found" in text
    # A chat name is not an embedding model, and the other way round.
    other = "emb" if path != EMBEDDINGS else "fake"
    assert post(client, path, {**VALID[path], "model": other}, route["key"]).status_code == 404
    assert fake.log(route["id"]) == [] and recorded() == 0


@pytest.mark.parametrize("path", VALID)
def test_missing_bad_and_revoked_keys_get_401(client, fake, route, path) -> None:  # type: ignore[no-untyped-def]
    revoked = client.post("/api/admin/apiKey", json={}, headers=ADMIN).get_json()["key"]
    assert client.delete(f"/api/admin/apiKey/{revoked}", headers=ADMIN).status_code == 200
    for key in (None, "sk-" + "0" * 32, revoked):
        resp = post(client, path, VALID[path], key)
        assert resp.status_code == 401, key
        kind, text, _ = error_of(resp, path)
        assert kind == "authentication_error" and "API key" in text
    # x-api-key is the other way to send a key, and a bad one there is refused too.
    resp = post(client, path, VALID[path], None, **{"x-api-key": "sk-bad"})
    assert resp.status_code == 401
    assert fake.log(route["id"]) == [] and recorded() == 0


@pytest.mark.parametrize("path", VALID)
def test_body_over_the_limit_gets_413(app, client, fake, route, path) -> None:  # type: ignore[no-untyped-def]
    app.config["MAX_CONTENT_LENGTH"] = 512
    body = {**VALID[path], "padding": "x" * 600}
    resp = post(client, path, body, route["key"])
    assert resp.status_code == 413
    kind, text, _ = error_of(resp, path)
    assert kind == ("request_too_large" if path == MESSAGES else "invalid_request_error")
    assert "512 bytes" in text
    assert fake.log(route["id"]) == [] and recorded() == 0


def test_embeddings_answer_is_the_upstreams_json_and_the_trailing_slash_works(
    client, fake, route
) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "emb", "input": ["a b", "c"], "dimensions": 3, "user": "u-1", "custom": 1}
    resp = post(client, EMBEDDINGS + "/", body, route["key"])
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    (sent,) = fake.log(route["id"])
    assert sent["body"] == {**body, "model": f"emb;id={route['id']}"}  # unknown fields too
    answer = resp.get_json()
    assert [len(item["embedding"]) for item in answer["data"]] == [3, 3]
    assert answer["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(("stream", "trailing"), [(False, ""), (False, "/"), (True, "/")])
def test_an_answer_has_the_headers_of_its_kind_and_its_limits(
    client, fake, route, stream, trailing
) -> None:  # type: ignore[no-untyped-def]
    """A call's answer is written by ``callwsgi.Answer``, not werkzeug's Response: the same
    headers, whichever way it was served."""
    if stream:
        resp = post(client, CHAT + trailing, {**VALID[CHAT], "stream": True}, route["key"])
    else:
        resp = post(client, EMBEDDINGS + trailing, {"model": "emb", "input": "a"}, route["key"])
    body = resp.get_data()
    assert resp.status_code == 200
    headers = dict(resp.headers)
    limits = {
        "X-RateLimit-Limit-RPM": str(10**9),
        "X-RateLimit-Remaining-RPM": headers.get("X-RateLimit-Remaining-RPM"),
        "X-RateLimit-Limit-TPM": str(10**9),
        "X-RateLimit-Remaining-TPM": str(10**9),
    }
    assert int(limits["X-RateLimit-Remaining-RPM"]) == 10**9 - 1
    if stream:
        kind = {
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "Content-Type": "text/event-stream; charset=utf-8",
        }
        assert body.endswith(b"data: [DONE]\n\n")
    else:
        kind = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    assert headers == {**kind, **limits}


@pytest.mark.parametrize("path", VALID)
def test_call_paths_take_post_only_and_exactly(client, fake, route, path) -> None:  # type: ignore[no-untyped-def]
    bearer = {"Authorization": f"Bearer {route['key']}"}
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        resp = client.open(path, method=method, headers=bearer)
        assert resp.status_code == 405, method
        assert error_of(resp, path)[0] == "invalid_request_error"
    assert client.head(path, headers=bearer).status_code == 405
    resp = client.options(path)
    assert resp.status_code == 200 and set(resp.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    # A final slash is the same path, as NexusGate's server has it; a "//" inside is
    # no path of ours.
    slashed = post(client, path + "/", VALID[path], route["key"])
    assert slashed.status_code == 200, slashed.get_data(as_text=True)
    assert client.get(path + "/", headers=bearer).status_code == 405
    inner = post(client, path.replace("/v1/", "/v1//"), VALID[path], route["key"])
    assert inner.status_code == 404 and error_of(inner, CHAT)[0] == "invalid_request_error"
    assert len(fake.log(route["id"])) == 1


@pytest.mark.parametrize("path", [CHAT, MESSAGES, EMBEDDINGS, EMBEDDINGS + "/"])
def test_a_bug_in_a_call_view_is_a_500_in_the_callers_shape_and_logged(
    app, client, fake, route, path, monkeypatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    app.config["PROPAGATE_EXCEPTIONS"] = False  # as served: TESTING lets it through

    def broken(headers: object) -> dict:
        raise RuntimeError("a bug in the view")

    monkeypatch.setattr(proxy, "forwarded_headers", broken)
    resp = post(client, path, VALID[path.rstrip("/")], route["key"])
    assert resp.status_code == 500
    # render_http_error's kind for any status but 404, as before the call routes moved.
    assert error_of(resp, path.rstrip("/"))[0] == "invalid_request_error"
    assert resp.headers["X-RateLimit-Limit-RPM"] == str(10**9)  # the key is known
    (logged,) = [r for r in caplog.records if r.name == "gateway" and r.levelname == "ERROR"]
    assert logged.getMessage() == f"Exception on {path} [POST]"
    assert "a bug in the view" in str(logged.exc_info[1])
    assert fake.log(route["id"]) == [] and recorded() == 0


def test_a_wait_where_a_stream_s_pump_must_not_wait_costs_the_call_never_its_record(
    client, fake, route, monkeypatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    """A stream's later events are moved by pumps the hub runs itself (relay.py), where a
    wait raises at once. A wait put into the translation (a bug of that kind) must end
    the call as the gateway's error, with the client's stream ended and the call
    recorded once: not lost, not left pending."""
    feed, fed_in = StreamTranslator.feed, []

    def waits(self, event):  # type: ignore[no-untyped-def]
        fed_in.append(gevent.getcurrent() is gevent.get_hub())
        gevent.sleep(0)  # harmless in a greenlet; in the hub, BlockingSwitchOutError
        return feed(self, event)

    monkeypatch.setattr(StreamTranslator, "feed", waits)
    resp = post(
        client,
        CHAT,
        {**VALID[CHAT], "stream": True},
        route["key"],
        **{"X-Fake-Script": "chunks=5;delay=0.05"},  # each event a read of its own
    )
    body = resp.get_data()
    assert resp.status_code == 200
    assert fed_in[0] is False and True in fed_in  # the first in the view, then the hub's
    assert b"Internal gateway error" in body  # the client's stream ended, in its shape
    assert recorded() == 1
    with database.connection_context():
        row = Completion.get()
    assert row.status == "failed" and "BlockingSwitchOutError" in row.error
    assert "call: producer failed" in caplog.text


@pytest.mark.parametrize(
    ("stream", "broken_part"),
    [(False, "completion"), (True, "completion"), (True, "response")],
    ids=["json", "stream", "stream-assembly"],
)
def test_an_answer_the_record_cannot_be_made_of_still_ends_the_call_recorded_once(
    client, fake, route, stream, broken_part, monkeypatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    """Reading the answer for the record (its text, usage, cost) runs after the client's
    answer is in hand. A bug there, or an answer no parser foresaw, must cost the record
    its details, never the call: the client still gets its answer, and the call is
    recorded once, final, saying why its details are missing (SPEC rules 1 and 2)."""
    from gateway.adapters import record

    def broken(*args: object) -> object:
        raise RuntimeError("a bug in the record")

    if broken_part == "completion":  # what the record keeps of the answer
        monkeypatch.setattr(record, "completion", broken)
    else:  # the stream's answer, assembled from its events
        monkeypatch.setattr(StreamTranslator, "response", broken)
    body = {**VALID[CHAT], "stream": True} if stream else VALID[CHAT]
    resp = client.post(
        CHAT,
        json=body,
        headers={"Authorization": f"Bearer {route['key']}"},
        buffered=True,
    )
    assert resp.status_code == 200
    text = resp.get_data(as_text=True)
    assert text.rstrip().endswith("data: [DONE]") if stream else "choices" in json.loads(text)
    assert recorded() == 1
    with database.connection_context():
        row = Completion.get()
    assert row.status == "completed"  # what the call was: only its record lacks details
    assert (
        row.error == "gateway error: the answer could not be recorded: "
        "RuntimeError('a bug in the record')"
    )
    assert row.completion is None and row.prompt_tokens is None
    assert "is recorded without what its answer says" in caplog.text


# -- hostile input: not JSON text, too deep, text the database cannot store ------------


def _hostile() -> list:
    def field(path: str, literal: bytes) -> bytes:
        """The valid body with ``literal`` (raw bytes) as the value of a field it has."""
        body = json.dumps({**VALID[path], "zz": "@@"}).encode()
        return body.replace(b'"@@"', literal)

    deep = b'{"a": [' * 500 + b"1" + b"]}" * 500
    cases = []
    for path in VALID:
        name = path.rsplit("/", 1)[1]
        for label, literal, message in (
            ("nan", b"NaN", "NaN is not a JSON number"),
            ("infinity", b"Infinity", "Infinity is not a JSON number"),
            ("minus-infinity", b"-Infinity", "-Infinity is not a JSON number"),
            ("overflow", b"1e999", "out of range"),
            ("cesu8", b'"\xed\xa0\x80"', "not UTF-8"),
            ("overlong", b'"\xc0\xaf"', "not UTF-8"),
            ("deep", deep, "nested more than 100 levels deep"),
        ):
            cases.append(pytest.param(path, field(path, literal), message, id=f"{name}-{label}"))
    return cases


@pytest.mark.parametrize(("path", "body", "message"), _hostile())
def test_what_is_not_json_text_gets_400_and_goes_nowhere(
    client, fake, route, path, body, message
) -> None:  # type: ignore[no-untyped-def]
    resp = post(client, path, body, route["key"])
    assert resp.status_code == 400
    kind, text, _ = error_of(resp, path)
    assert kind == "invalid_request_error" and message in text
    assert fake.log(route["id"]) == [] and recorded() == 0


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_nesting_at_the_bound_is_served(client, fake, route, path) -> None:  # type: ignore[no-untyped-def]
    schema: object = {"type": "string"}
    for _ in range(40):  # 2 levels each, inside tools[0]...: about 85 deep in all
        schema = {"type": "object", "properties": {"p": schema}}
    body = {**VALID[path], "metadata_extra": schema}
    assert post(client, path, body, route["key"]).status_code == 200
    assert recorded() == 1


@pytest.mark.parametrize("path", [CHAT, RESPONSES, EMBEDDINGS])
def test_text_the_database_cannot_store_is_replaced_in_what_is_sent_and_recorded(
    client, fake, route, path
) -> None:  # type: ignore[no-untyped-def]
    # Escaped lone surrogates and NUL are valid JSON; PostgreSQL refuses both and a
    # page holding a surrogate cannot be encoded. They become U+FFFD, sent and kept alike.
    hostile = "a\\ud800b\\udfffc\\u0000d"
    cleaned = "a\ufffdb\ufffdc\ufffdd"
    if path == CHAT:
        raw = b'{"model": "fake", "messages": [{"role": "user", "content": "%s"}]}'
    elif path == RESPONSES:
        raw = b'{"model": "fake", "input": "%s"}'
    else:
        raw = b'{"model": "emb", "input": ["%s"]}'
    resp = post(client, path, raw.replace(b"%s", hostile.encode()), route["key"])
    assert resp.status_code == 200
    (sent,) = fake.log(route["id"])
    assert cleaned in json.dumps(sent["body"], ensure_ascii=False)
    assert recorded() == 1
    with database.connection_context():
        row = Completion.get_or_none() if path != EMBEDDINGS else Embedding.get()
        stored = row.prompt if path != EMBEDDINGS else row.input
    assert cleaned in json.dumps(stored, ensure_ascii=False)
    assert "\\ud800" not in json.dumps(stored)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_an_answer_the_database_cannot_store_reaches_the_client_whole_and_is_recorded(
    client, fake, route, path, stream
) -> None:  # type: ignore[no-untyped-def]
    # The upstream's text carries a lone surrogate and NUL (escaped, as JSON allows):
    # the client gets them as sent (relayed, or converted); the record has U+FFFD.
    resp = post(
        client,
        path,
        {**VALID[path], "stream": stream},
        route["key"],
        **{"X-Fake-Script": "unstorable=1"},
    )
    assert resp.status_code == 200
    body = resp.get_data()
    if stream:
        events = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]
        deltas = [e["choices"][0]["delta"] for e in events if e.get("choices")]
        texts = [d.get("content") or "" for d in deltas] + [
            e["delta"].get("text", "") for e in events if e.get("type") == "content_block_delta"
        ]
        text = "".join(texts)
    else:
        answer = json.loads(body)
        text = (
            answer["choices"][0]["message"]["content"]
            if path == CHAT
            else answer["content"][0]["text"]
        )
    assert text == "".join(f"tok{i}\ud800\x00 " for i in range(5))
    assert recorded() == 1
    with database.connection_context():
        row = Completion.get()
    assert (row.status, row.completion[0]["content"]) == (
        "completed",
        "".join(f"tok{i}\ufffd\ufffd " for i in range(5)),
    )


def test_credential_headers_are_neither_forwarded_nor_recorded(client, fake, route) -> None:  # type: ignore[no-untyped-def]
    credentials = {
        "api-key": "azure-secret-1",
        "x-goog-api-key": "google-secret-2",
        "X-Custom-Token": "token-secret-3",
        "x-my-secret": "secret-4",
        "X-Session-Id": "session-secret-5",
        "x-password": "password-6",
        "x-upstream-credential": "credential-7",
        "X-Forward-Auth": "auth-8",
        "x-innocent-name": "Bearer bearer-secret-9",
        "Cookie": "sid=cookie-secret-10",
        "Proxy-Authorization": "Basic proxy-secret-11",
    }
    kept = {"anthropic-beta": "tools-2024", "x-request-id": "r-1", "x-stainless-os": "Linux"}
    resp = post(client, CHAT, VALID[CHAT], route["key"], **credentials, **kept)
    assert resp.status_code == 200
    (sent,) = fake.log(route["id"])
    assert recorded() == 1
    with database.connection_context():
        extra = Completion.get().prompt.get("extraHeaders", {})
    for where in (sent["headers"], extra):
        for name, value in kept.items():
            assert where.get(name) == value
        text = json.dumps(where)
        assert not any(secret in text for secret in credentials.values()), where
    # The upstream's own auth is the provider's, set by the gateway; never the client's key.
    assert route["key"] not in json.dumps(sent["headers"])


MALFORMED_CHUNKS = {
    "bad-size": b"zz\r\nabc\r\n0\r\n\r\n",
    "no-terminator": b"5\r\nabcdeXX0\r\n\r\n",
    "cut-short": b'40\r\n{"model": ',
}


def raw_post(gw, path: str, headers: dict[str, str], chunks: bytes) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    """POST a chunked body exactly as given over a raw socket; (status, body)."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: application/json\r\nConnection: close\r\n{head}\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(request + chunks)
        sock.shutdown(socket.SHUT_WR)  # the body ends here, whatever its framing says
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.server
def test_a_malformed_chunked_body_gets_400_in_the_callers_shape(gateway, fake) -> None:  # type: ignore[no-untyped-def]
    key = gateway.setup_route(fake.url)["key"]
    bearer = {"Authorization": f"Bearer {key}"}
    admin = {"Authorization": f"Bearer {ADMIN_SECRET}"}
    for name, chunks in MALFORMED_CHUNKS.items():
        status, body = raw_post(gateway, CHAT, bearer, chunks)
        assert status == 400, (name, body)
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        status, body = raw_post(gateway, MESSAGES, bearer, chunks)
        assert status == 400 and json.loads(body)["type"] == "error", (name, body)
        status, body = raw_post(gateway, "/api/admin/apiKey", admin, chunks)
        assert status == 400 and json.loads(body)["error"], (name, body)
        status, _ = raw_post(gateway, "/login", {}, chunks)
        assert status == 400, name
    assert gateway.records() == []
    assert "Error handling request" not in gateway.log()
    assert "Traceback" not in gateway.log()


@pytest.mark.server
def test_a_chunked_body_past_the_limit_gets_413_and_goes_nowhere(gateway_factory, fake) -> None:  # type: ignore[no-untyped-def]
    # A length tells the limit at once; a chunked body only as it is read. It was cut at
    # the limit and parsed: JSON cut short got a 400, JSON followed by spaces past the
    # limit was forwarded and recorded.
    limit = 4096
    gw = gateway_factory(GATEWAY_MAX_BODY_BYTES=str(limit))
    mark = uuid.uuid4().hex
    route = gw.setup_route(fake.url, system_name="chunked", remote_id=f"fake;id={mark}")
    bearer = {"Authorization": f"Bearer {route['key']}"}

    def chunked(body: bytes) -> bytes:
        pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"

    def body(path: str, padding: str, after: bytes = b"") -> bytes:
        sent = {**VALID[path], "model": "chunked", "padding": padding}
        return json.dumps(sent).encode() + after

    for path in (CHAT, MESSAGES):
        for over in (body(path, "x" * limit), body(path, "", b" " * limit)):
            status, answer = raw_post(gw, path, bearer, chunked(over))
            assert status == 413, answer
            error = json.loads(answer)["error"]  # in the caller's shape
            assert error["type"] == (
                "request_too_large" if path == MESSAGES else "invalid_request_error"
            )
            assert f"{limit} bytes" in error["message"]
        exact = body(path, "")
        exact += b" " * (limit - len(exact))
        pieces = iter([exact[: limit // 2], exact[limit // 2 :]])  # requests sends it chunked
        answer = requests.post(gw.url + path, data=pieces, headers=bearer, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.request.headers["Transfer-Encoding"] == "chunked"
    assert len(fake.log(mark)) == 2
    assert len(gw.wait_final(2)) == 2


def test_api_usage_sums_the_calling_keys_tokens(client, fake, route, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/api/usage").status_code == 401
    auth = {"Authorization": f"Bearer {route['key']}"}
    assert client.get("/api/usage", headers=auth).get_json() == {
        "total_prompt_tokens": 0,
        "total_completion_tokens": 0,
    }
    post(client, CHAT, VALID[CHAT], route["key"])
    post(client, MESSAGES, VALID[MESSAGES], route["key"])
    recorded()
    sent = fake.log(route["id"])
    usage = client.get("/api/usage", headers={"x-api-key": route["key"]}).get_json()
    assert usage == {
        "total_prompt_tokens": sum(c["usage"]["input_tokens"] for c in sent),
        "total_completion_tokens": sum(c["usage"]["output_tokens"] for c in sent),
    }
    from gateway import stats

    def away(key: int) -> None:
        raise OSError("connection refused")

    monkeypatch.setattr(stats, "key_totals", away)
    down = client.get("/api/usage", headers=auth)
    assert down.status_code == 503 and down.get_json()["error"]["code"] == "database_unavailable"


def test_metrics_are_open_unless_a_token_is_set(app, client) -> None:  # type: ignore[no-untyped-def]
    open_ = client.get("/metrics")
    # NexusGate's own type: the text format 0.0.4, which every Prometheus reads.
    assert open_.status_code == 200
    assert open_.content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert "nexusgate_active_providers" in open_.get_data(as_text=True)
    app.config["METRICS_TOKEN"] = "s3cret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_metrics_count_the_catalog_from_memory_and_need_no_database(
    client, route, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    revoked = client.post("/api/admin/apiKey", json={}, headers=ADMIN).get_json()["key"]
    client.delete(f"/api/admin/apiKey/{revoked}", headers=ADMIN)
    past = {"expiresAt": "2001-01-01T00:00:00Z"}
    client.post("/api/admin/apiKey", json=past, headers=ADMIN)
    auth.keys.forget_all()  # the cache is the process's: drop keys of another test's database
    assert post(client, CHAT, VALID[CHAT], route["key"]).status_code == 200  # keys, catalog read

    def away() -> None:
        raise peewee.OperationalError("connection refused")

    monkeypatch.setattr(database.obj, "connect", away)  # the database is gone from here on
    scraped = client.get("/metrics")
    assert scraped.status_code == 200
    text = scraped.get_data(as_text=True)
    # One usable key (not the revoked or the expired one), one provider, a model of each type.
    assert "\nnexusgate_active_api_keys 1.0\n" in text
    assert "\nnexusgate_active_providers 1.0\n" in text
    assert '\nnexusgate_active_models{type="chat"} 1.0\n' in text
    assert '\nnexusgate_active_models{type="embedding"} 1.0\n' in text


_HEADER_NAMES = st.sampled_from(
    [
        "HTTP_USER_AGENT", "HTTP_X_STAINLESS_OS", "HTTP_HOST", "HTTP_CONTENT_TYPE",
        "HTTP_CONTENT_LENGTH", "CONTENT_TYPE", "CONTENT_LENGTH", "HTTP_AUTHORIZATION",
        "HTTP_X_API_KEY", "HTTP_X_NEXUSGATE_REQID", "HTTP_SEC_FETCH_MODE", "HTTP_PROXY_X",
        "HTTP_COOKIE", "HTTP_ANTHROPIC_BETA", "HTTP_X_MY_SECRET", "REMOTE_ADDR", "PATH_INFO",
        "wsgi.url_scheme", "HTTP_", "HTTP_X_Mixed_Case",
    ]
) | st.from_regex(r"HTTP_[A-Za-z0-9_]{1,12}", fullmatch=True)  # fmt: skip
_HEADER_VALUES = st.sampled_from(["Bearer sk-1", " basic x", "digest  y", "Linux", ""]) | st.text(
    st.characters(min_codepoint=32, max_codepoint=255), max_size=12
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_HEADER_NAMES, _HEADER_VALUES, max_size=12))
def test_the_headers_passed_on_are_werkzeug_s_by_the_rules(environ: dict[str, str]) -> None:
    """Read off the environ (a name's verdict kept from call to call), the same headers
    as Werkzeug's, filtered by the rules the way they were filtered through it."""
    expected = {}
    for name, value in EnvironHeaders(environ):
        lower = name.lower()
        if (
            lower in client_headers._NOT_FORWARDED
            or lower.startswith(client_headers._NOT_FORWARDED_PREFIXES)
            or redact.credential_header(lower, value)
        ):
            continue
        expected[lower] = value
    assert client_headers.forwarded_headers(environ) == expected
    assert client_headers.forwarded_headers(environ) == expected  # the names' verdicts now kept


@pytest.mark.parametrize(
    ("accept", "streamed"),
    [
        (None, False),
        ("application/json", False),
        ("*/*", False),
        ("text/event-stream", True),
        ("application/json, text/event-stream;q=0.5", True),
        ("Text/Event-Stream", False),  # the exact media type, as before
        ("text/event-stream;q=0", False),
        ("text/event-streams", False),
    ],
)
def test_a_call_without_stream_streams_if_it_accepts_only_an_event_stream_by_name(
    client, route, accept: str | None, streamed: bool
) -> None:  # type: ignore[no-untyped-def]
    headers = {} if accept is None else {"Accept": accept}
    resp = post(client, CHAT, VALID[CHAT], route["key"], **headers)
    assert resp.status_code == 200
    assert (resp.mimetype == "text/event-stream") is streamed
