"""The upstream fault catalogue: every way a provider can fail, seen by every client format.

Each fault is a script for the fake upstream (``tests/fake_upstream.py``), sent in the
``X-Fake-Script`` header, so one gateway serves the module, on one backend
(``ONE_BACKEND``: how a fault is met does not depend on the database). Every system
name has two providers of one type, so "2 tries per provider, then the next" shows in
the attempts.

- Before the first byte (``BEFORE``): the client gets 502 (504 after a timeout), or the
  upstream's own 4xx, in its protocol's error shape, and exactly one ``failed`` record
  lists all four tries. With ``heal_after=2`` the same fault on the first provider only
  is failed over: the second provider answers and the record is ``completed``.
- Mid-stream (``MID``): the client already has a 200 and part of the answer; it gets a
  protocol-correct error event and a clean end of the stream (its SDK raises, or yields
  the Responses ``error`` event), and exactly one ``failed`` record keeps the partial text.

Before the first byte the gateway's behaviour does not depend on the upstream protocol,
so those faults run once per client format, each against another provider protocol
(``ROTATED``: every client and every protocol once). Mid-stream it does (parsing,
relaying unchanged or converting), so those run for all nine pairs, with the SDKs and
again as raw bytes where framing must be exact.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import pytest
import requests

from tests.servers import Gateway

pytestmark = pytest.mark.server
ONE_BACKEND = True  # see tests/conftest.py

# Short, so a stall costs little; the fake answers in milliseconds otherwise.
GATEWAY_ENV = {"GATEWAY_READ_TIMEOUT": "0.5"}

CHAT, ANTHROPIC, RESPONSES = "openai-chat", "anthropic", "openai-responses"
CLIENTS = (CHAT, ANTHROPIC, RESPONSES)
PROVIDERS = ("openai", "anthropic", "openai-responses")  # one per upstream protocol
ROTATED = [(CHAT, "anthropic"), (ANTHROPIC, "openai-responses"), (RESPONSES, "openai")]
ALL_PAIRS = [(client, provider) for client in CLIENTS for provider in PROVIDERS]
MODES = ("json", "stream")

PROMPT = [{"role": "user", "content": "tell me a story"}]
TEXT = "tok0 tok1 tok2 tok3 tok4 "  # the fake's answer: 5 pieces
# Stream events each provider protocol sends before its first text piece.
LEAD = {"openai": 1, "anthropic": 3, "openai-responses": 4}
STALL = "2"  # seconds; well past READ_TIMEOUT


@dataclass(frozen=True)
class Fault:
    name: str
    script: str  # the fake upstream's knobs
    outcome: str  # each failed try's outcome in the record (before the first byte)
    status: int = 502  # what the client gets (before the first byte)
    modes: tuple[str, ...] = MODES
    http_status: int | None = None  # the upstream's, in each attempt
    retriable: bool = True
    said: str | None = None  # in each try's error, where the upstream said why

    def __str__(self) -> str:
        return self.name


BEFORE = [
    Fault("500", "status=500", "http", http_status=500),
    Fault("429", "status=429", "http", http_status=429),
    Fault("503", "status=503", "http", http_status=503),
    Fault("400 passed on", "status=400", "http", 400, http_status=400, retriable=False),
    Fault("reset before headers", "reset_before_headers=1", "reset"),
    Fault("stall before headers", f"header_delay={STALL}", "timeout", 504),
    Fault("invalid JSON with 200", "garbage=1", "protocol"),
    Fault("an error body with 200", "status=200", "protocol", said="fake error 200"),
    Fault("text/html with 200", "content_type=text/html", "protocol"),
    Fault("JSON to a stream", "content_type=application/json", "protocol", modes=("stream",)),
    Fault("SSE to a JSON call", "content_type=text/event-stream", "protocol", modes=("json",)),
    Fault("no event before the end", "truncate_at=0", "protocol", modes=("stream",)),
    Fault(
        "an error event first with 200",
        "error_first=1",
        "protocol",
        modes=("stream",),
        said="fake upstream failure",
    ),
    Fault("reset mid-body", "reset_at=20", "reset", modes=("json",)),
    Fault("stall mid-body", f"body_stall={STALL}", "timeout", 504, modes=("json",)),
    Fault("truncated body", "truncate_at=20", "protocol", modes=("json",)),
]


@dataclass(frozen=True)
class MidFault:
    name: str
    script: str  # {cut}: the index of the third text piece's event
    reason: str | None  # in the record's error
    partial: str  # the text that arrived before the fault
    pairs: tuple[tuple[str, str], ...] = tuple(ALL_PAIRS)

    def __str__(self) -> str:
        return self.name


MID = [
    MidFault("reset mid-stream", "reset_at={cut}", "mid-stream: reset", "tok0 tok1 "),
    MidFault("closed mid-stream", "drop_at={cut}", "mid-stream: reset", "tok0 tok1 "),
    MidFault(
        "stall mid-stream",
        f"stall_at={{cut}};stall_for={STALL}",
        "mid-stream: timeout",
        "tok0 tok1 ",
    ),
    MidFault("truncated stream", "truncate_at=-1", "without its terminal event", TEXT),
    # The words of its reason are the fix's to choose.
    MidFault("invalid JSON mid-stream", "bad_json_at={cut}", None, "tok0 tok1 "),
    # Refused once past ``upstream.MAX_EVENT``, 256 MB: about 2.5 s a try, so each client
    # and each provider protocol once.
    MidFault(
        "an event that never ends",
        "endless_at={cut}",
        "still unfinished",
        "tok0 tok1 ",
        tuple(ROTATED),
    ),
]


def _cases(faults: list[Fault], pairs: list[tuple[str, str]], heal: bool = False) -> list:
    return [
        pytest.param(fault, client, provider, mode, id=f"{fault}-{client}-{provider}-{mode}")
        for fault in faults
        if fault.retriable or not heal
        for client, provider in pairs
        for mode in fault.modes
    ]


# -- the gateway and its callers -----------------------------------------------------


@pytest.fixture(scope="module")
def systems(module_gateway: Gateway, fake) -> dict[str, tuple[str, set[str]]]:  # type: ignore[no-untyped-def]
    """provider type -> (system name, its two providers' names)."""
    out = {}
    for provider in PROVIDERS:
        name = f"faults-{provider}"
        routes = [
            module_gateway.setup_route(fake.url, provider_type=provider, system_name=name)
            for _ in range(2)
        ]
        out[provider] = (name, {r["provider"]["name"] for r in routes})
    return out


@dataclass
class Caller:
    """One test's key: its calls, scripted apart by a call id, and its records."""

    gw: Gateway
    fake: Any
    key: str
    key_id: int
    call_id: str

    def headers(self, script: str) -> dict[str, str]:
        return {"X-Fake-Script": f"id={self.call_id};{script}"}

    def record(self) -> dict:
        """The one record of this key, once final (two would fail)."""
        rows = self.gw.wait_final(1, apiKeyId=self.key_id)
        assert len(rows) == 1, f"expected exactly one record, got {len(rows)}"
        return rows[0]

    def tries(self) -> list[dict]:
        """What the upstream saw of this test's calls."""
        return self.fake.log(self.call_id)


@pytest.fixture
def caller(module_gateway: Gateway, fake) -> Caller:  # type: ignore[no-untyped-def]
    key = module_gateway.api("POST", "/apiKey", json={"comment": "faults"})
    return Caller(module_gateway, fake, key["key"], key["id"], uuid.uuid4().hex)


@dataclass
class Seen:
    """What a client's SDK made of a call."""

    text: str = ""
    raised: Exception | None = None
    events: list[Any] = field(default_factory=list)


def ask(caller: Caller, client: str, model: str, stream: bool, script: str) -> Seen:
    """One call with the client format's official SDK."""
    seen, url, headers = Seen(), caller.gw.url, caller.headers(script)
    try:
        if client == ANTHROPIC:
            sdk = anthropic.Anthropic(base_url=url, api_key=caller.key, max_retries=0)
            _messages(sdk, model, stream, headers, seen)
        else:
            sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=caller.key, max_retries=0)
            (_chat if client == CHAT else _responses)(sdk, model, stream, headers, seen)
    except Exception as exc:  # whatever the SDK raised is for the test to judge
        seen.raised = exc
    return seen


def _chat(sdk: openai.OpenAI, model: str, stream: bool, headers: dict, seen: Seen) -> None:
    args = {"model": model, "messages": PROMPT, "extra_headers": headers}
    if not stream:
        seen.text = sdk.chat.completions.create(**args).choices[0].message.content
        return
    for chunk in sdk.chat.completions.create(**args, stream=True):
        seen.events.append(chunk)
        if chunk.choices:
            seen.text += chunk.choices[0].delta.content or ""


def _messages(
    sdk: anthropic.Anthropic, model: str, stream: bool, headers: dict, seen: Seen
) -> None:
    args = {"model": model, "max_tokens": 100, "messages": PROMPT, "extra_headers": headers}
    if not stream:
        seen.text = sdk.messages.create(**args).content[0].text
        return
    for event in sdk.messages.create(**args, stream=True):
        seen.events.append(event)
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            seen.text += event.delta.text


def _responses(sdk: openai.OpenAI, model: str, stream: bool, headers: dict, seen: Seen) -> None:
    args = {"model": model, "input": "tell me a story", "extra_headers": headers}
    if not stream:
        seen.text = sdk.responses.create(**args).output_text
        return
    for event in sdk.responses.create(**args, stream=True):
        seen.events.append(event)
        if event.type == "response.output_text.delta":
            seen.text += event.delta


def error_message(client: str, exc: Exception) -> str:
    """The message of an error answer, checked to be in the client's protocol shape."""
    body = exc.response.json()
    if client == ANTHROPIC:
        assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}, body
        return body["error"]["message"]
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]["message"]


# -- before the first byte -------------------------------------------------------------


@pytest.mark.parametrize(("fault", "client", "provider", "mode"), _cases(BEFORE, ROTATED))
def test_a_fault_before_the_first_byte(
    caller: Caller, systems: dict, fault: Fault, client: str, provider: str, mode: str
) -> None:
    model, providers = systems[provider]
    seen = ask(caller, client, model, mode == "stream", fault.script)

    assert isinstance(seen.raised, openai.APIStatusError | anthropic.APIStatusError), seen
    assert seen.raised.status_code == fault.status
    message = error_message(client, seen.raised)
    row = caller.record()
    assert row["status"] == "failed" and row["completion"] == []
    attempts = row["attempts"]
    assert [a["outcome"] for a in attempts] == [fault.outcome] * len(attempts)
    assert [a.get("status") for a in attempts] == [fault.http_status] * len(attempts)
    if fault.said:
        assert all(fault.said in a["error"] for a in attempts), attempts
    assert len(caller.tries()) == len(attempts)
    if not fault.retriable:  # passed on as the upstream said it, no failover
        assert len(attempts) == 1 and message == f"fake error {fault.http_status}"
        return
    # Two tries at one provider, then two at the other.
    names = [a["provider"] for a in attempts]
    assert len(names) == 4 and names[0] == names[1] != names[2] == names[3], names
    assert set(names) == providers
    assert "All upstream providers failed (4 attempts)" in message
    assert row["error"].startswith("All upstream providers failed (4 attempts)")


@pytest.mark.parametrize(("fault", "client", "provider", "mode"), _cases(BEFORE, ROTATED, True))
def test_a_fault_before_the_first_byte_fails_over_to_the_next_provider(
    caller: Caller, systems: dict, fault: Fault, client: str, provider: str, mode: str
) -> None:
    model, _ = systems[provider]
    seen = ask(caller, client, model, mode == "stream", f"heal_after=2;{fault.script}")

    assert seen.raised is None and seen.text == TEXT
    row = caller.record()
    assert row["status"] == "completed" and row["completion"][0]["content"] == TEXT
    attempts = row["attempts"]
    assert [a["outcome"] for a in attempts] == [fault.outcome, fault.outcome, "ok"]
    names = [a["provider"] for a in attempts]
    assert names[0] == names[1] != names[2], names


def test_a_first_event_that_never_ends_is_failed_over(caller: Caller, systems: dict) -> None:
    """A 200 event-stream whose first event never ends (a base URL serving something
    else, a broken proxy) is refused past ``upstream.MAX_EVENT`` as ``protocol``, and
    the next try answers. One case: each try moves 256 MB."""
    model, _ = systems["anthropic"]
    seen = ask(caller, CHAT, model, True, "heal_after=1;endless_at=0")

    assert seen.raised is None and seen.text == TEXT
    row = caller.record()
    assert row["status"] == "completed" and row["completion"][0]["content"] == TEXT
    failed, ok = row["attempts"]
    assert (failed["outcome"], ok["outcome"]) == ("protocol", "ok")
    assert "an event still unfinished after" in failed["error"]
    assert caller.tries()[0]["outcome"] == "client_gone"  # the gateway hung up on it


# An error after only the events that open a stream and carry nothing a client could use
# (Anthropic's ``message_start`` and ``ping``, Responses' ``response.created`` and
# ``response.in_progress``): an overloaded model after its start. Nothing has gone to
# the client yet, so it fails over as an error before the first byte does.
OPENING_ONLY = [
    pytest.param(ANTHROPIC, "anthropic", "error_after=2", id="start-ping-error"),
    pytest.param(ANTHROPIC, "anthropic", "error_after=1", id="start-error"),
    pytest.param(ANTHROPIC, "anthropic", "ping_first=1;error_after=1", id="ping-error"),
    pytest.param(CHAT, "anthropic", "error_after=2", id="start-ping-error-converted"),
    pytest.param(RESPONSES, "openai-responses", "error_after=2", id="created-progress-error"),
    pytest.param(ANTHROPIC, "openai-responses", "error_after=1", id="created-error-converted"),
]


@pytest.mark.parametrize(("client", "provider", "script"), OPENING_ONLY)
def test_an_error_after_only_the_opening_events_is_failed_over(
    caller: Caller, systems: dict, client: str, provider: str, script: str
) -> None:
    model, providers = systems[provider]
    seen = ask(caller, client, model, True, f"heal_after=2;{script}")

    assert seen.raised is None and seen.text == TEXT
    row = caller.record()
    assert row["status"] == "completed" and row["completion"][0]["content"] == TEXT
    attempts = row["attempts"]
    assert [a["outcome"] for a in attempts] == ["protocol", "protocol", "ok"]
    assert all("fake upstream failure" in a["error"] for a in attempts[:2]), attempts
    names = [a["provider"] for a in attempts]
    assert names[0] == names[1] != names[2] and set(names) == providers
    assert len(caller.tries()) == 3


def test_an_error_after_a_content_block_opened_is_not_failed_over(
    caller: Caller, systems: dict
) -> None:
    """``content_block_start`` goes to the client: past it, an error is mid-stream."""
    model, _ = systems["anthropic"]
    seen = ask(caller, ANTHROPIC, model, True, "error_after=3")

    assert isinstance(seen.raised, anthropic.APIError), seen
    assert [e.type for e in seen.events] == ["message_start", "content_block_start"]
    row = caller.record()
    assert row["status"] == "failed" and "fake upstream failure" in row["error"]
    assert [a["outcome"] for a in row["attempts"]] == ["ok"]  # no failover after a byte
    assert len(caller.tries()) == 1


# -- mid-stream ------------------------------------------------------------------------


def _mid_cases(faults: list[MidFault]) -> list:
    return [
        pytest.param(fault, client, provider, id=f"{fault}-{client}-{provider}")
        for fault in faults
        for client, provider in fault.pairs
    ]


def _mid_script(fault: MidFault, provider: str) -> str:
    return fault.script.format(cut=LEAD[provider] + 2)


def check_failed_mid_stream(caller: Caller, fault: MidFault) -> None:
    row = caller.record()
    assert row["status"] == "failed"
    assert row["completion"][0]["content"] == fault.partial
    if fault.reason:
        assert fault.reason in row["error"]
    assert [a["outcome"] for a in row["attempts"]] == ["ok"]  # no failover after a byte
    assert len(caller.tries()) == 1


@pytest.mark.parametrize(("fault", "client", "provider"), _mid_cases(MID))
def test_a_fault_mid_stream(
    caller: Caller, systems: dict, fault: MidFault, client: str, provider: str
) -> None:
    model, _ = systems[provider]
    seen = ask(caller, client, model, True, _mid_script(fault, provider))

    assert seen.text == fault.partial
    if client == RESPONSES:  # the SDK yields the error event; the stream has no completion
        types = [e.type for e in seen.events]
        assert "error" in types, types
        assert "response.completed" not in types and "response.incomplete" not in types
    else:
        error = openai.APIError if client == CHAT else anthropic.APIError
        assert isinstance(seen.raised, error), seen
        assert not isinstance(seen.raised, openai.APIConnectionError | anthropic.APIConnectionError)
    check_failed_mid_stream(caller, fault)


# What a raw client receives, frame by frame: the end of the stream must be clean and
# the error frame must be what the protocol's SDKs read.

PATHS = {CHAT: "/v1/chat/completions", ANTHROPIC: "/v1/messages", RESPONSES: "/v1/responses"}


def raw_stream(caller: Caller, client: str, model: str, script: str) -> list[tuple[str, str]]:
    """POST a streaming call; return its SSE frames as (event, data)."""
    body: dict[str, Any] = {"model": model, "stream": True}
    if client == RESPONSES:
        body["input"] = "tell me a story"
    else:
        body.update(messages=PROMPT, **({"max_tokens": 100} if client == ANTHROPIC else {}))
    resp = requests.post(
        caller.gw.url + PATHS[client],
        json=body,
        headers={"Authorization": f"Bearer {caller.key}", **caller.headers(script)},
        stream=True,
        timeout=30,
    )
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = b"".join(resp.iter_content(None))  # a broken chunked ending raises here
    return parse_frames(raw.decode())


def parse_frames(text: str) -> list[tuple[str, str]]:
    """SSE frames (comments skipped), written apart from the gateway's decoder."""
    frames = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event, data = "", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            frames.append((event, "\n".join(data)))
    return frames


def check_chat_frames(frames: list[tuple[str, str]]) -> str:
    *chunks, (_, error), (_, done) = frames
    assert done == "[DONE]"
    error = json.loads(error)["error"]
    assert set(error) >= {"message", "type"}, error
    bodies = [json.loads(data) for _, data in chunks]
    assert not any(c.get("error") for c in bodies), "one error, at the end"
    assert not any(ch.get("finish_reason") for c in bodies for ch in c.get("choices", []))
    return "".join(ch["delta"].get("content") or "" for c in bodies for ch in c["choices"])


def check_anthropic_frames(frames: list[tuple[str, str]]) -> str:
    *events, (kind, error) = frames
    assert kind == "error"
    error = json.loads(error)
    assert error["type"] == "error" and set(error["error"]) >= {"type", "message"}, error
    assert [k for k, _ in events].count("message_start") == 1
    assert not {"error", "message_stop"} & {k for k, _ in events}
    deltas = [json.loads(d)["delta"] for k, d in events if k == "content_block_delta"]
    return "".join(d.get("text", "") for d in deltas)


def check_responses_frames(frames: list[tuple[str, str]]) -> str:
    bodies = [json.loads(data) for _, data in frames]
    assert [kind for kind, _ in frames] == [b["type"] for b in bodies]
    # In order, the gateway's own error event too: the SDK's ``starting_after`` (resuming
    # a stream) drops every event numbered at or below the one it resumes after.
    assert [b["sequence_number"] for b in bodies] == list(range(len(bodies)))
    types = [b["type"] for b in bodies]
    assert types[0] == "response.created" and types.count("error") == 1, types
    assert types[-1] in ("error", "response.failed"), types
    assert not {"response.completed", "response.incomplete"} & set(types)
    return "".join(b["delta"] for b in bodies if b["type"] == "response.output_text.delta")


CHECK_FRAMES = {
    CHAT: check_chat_frames,
    ANTHROPIC: check_anthropic_frames,
    RESPONSES: check_responses_frames,
}


# Not the stall (it takes its seconds) nor the endless event (256 MB a case): their error
# frames are the ones every other fault here ends in.
@pytest.mark.parametrize(
    ("fault", "client", "provider"),
    _mid_cases([f for f in MID if "stall" not in f.name and "never" not in f.name]),
)
def test_a_fault_mid_stream_ends_in_one_error_frame(
    caller: Caller, systems: dict, fault: MidFault, client: str, provider: str
) -> None:
    model, _ = systems[provider]
    frames = raw_stream(caller, client, model, _mid_script(fault, provider))
    assert CHECK_FRAMES[client](frames) == fault.partial
    check_failed_mid_stream(caller, fault)
