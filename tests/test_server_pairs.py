"""Every client format with every provider type, through gunicorn, the official SDKs and
the fake upstream: what the SDK parsed, what the upstream received, what was recorded.

One gateway serves the module, on one backend (``ONE_BACKEND``: conversions do not
depend on the database); each test has its own key (its records) and call ids (the
fake's log). The README's compatibility matrix is built from this
module: ``covers`` ties each test to the features it checks and the pairs it runs for,
and ``LOSSY`` lists what a pair loses; tests branch on ``lossy(...)`` and assert the
loss itself, so a note cannot outlive the behaviour, and ``test_readme_matrix`` keeps
the README in step with both.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import pytest
import requests

from tests import pairs_support as p
from tests.pairs_support import ANTHROPIC, CHAT, CLIENTS, PROVIDERS, RESPONSES, UPSTREAM
from tests.servers import ROOT, Gateway

pytestmark = pytest.mark.server
ONE_BACKEND = True  # see tests/conftest.py

PAIRS = [(client, provider) for client in CLIENTS for provider in PROVIDERS]
FEATURES = (
    "text",
    "streaming",
    "tools",
    "tool choice",
    "reasoning",
    "images",
    "usage",
    "stop reasons",
    "errors",
    "unmapped fields",
)
_COVERAGE: dict[str, tuple[frozenset[str], list[tuple[str, str]]]] = {}


def covers(*features: str, pairs: Iterable[tuple[str, str]] = PAIRS) -> Callable:
    """Declare what a test checks, and run it for each of ``pairs``."""
    unknown = set(features) - set(FEATURES)
    assert not unknown, unknown
    pairs = list(pairs)

    def mark(test: Callable) -> Callable:
        _COVERAGE[test.__name__] = (frozenset(features), pairs)
        return pytest.mark.parametrize(("client", "provider"), pairs)(test)

    return mark


@dataclass(frozen=True)
class Lossy:
    key: str  # what the tests ask ``lossy`` for
    feature: str  # the matrix column
    pairs: frozenset[tuple[str, str]]
    text: str


def _pairs(clients: Iterable[str], providers: Iterable[str]) -> frozenset[tuple[str, str]]:
    return frozenset((c, q) for c in clients for q in providers)


_CHAT_PROVIDERS = [q for q in PROVIDERS if UPSTREAM[q] == CHAT]
LOSSY = [
    Lossy(
        "message-name",
        "text",
        _pairs([CHAT], ["anthropic", "openai-responses"]),
        "a message's `name` is dropped (the provider's format has no such field)",
    ),
    Lossy(
        "reasoning-not-replayed",
        "reasoning",
        _pairs([CHAT, RESPONSES], ["anthropic"]) | _pairs([CHAT, ANTHROPIC], ["openai-responses"]),
        "reasoning the client sends back in its history is left out: this provider takes "
        "back only its own (Anthropic's signed thinking, Responses' reasoning items)",
    ),
    Lossy(
        "unsigned-thinking",
        "reasoning",
        _pairs([ANTHROPIC], [q for q in PROVIDERS if q != "anthropic"]),
        "thinking blocks come with an empty `signature`: only Anthropic signs thinking",
    ),
    Lossy(
        "tool-result-images",
        "images",
        _pairs([ANTHROPIC, RESPONSES], _CHAT_PROVIDERS),
        "an image inside a tool result moves to a user message right after the tool "
        "messages (chat tool messages carry text only)",
    ),
    Lossy(
        "late-input-tokens",
        "usage",
        _pairs([ANTHROPIC], [q for q in PROVIDERS if q != "anthropic"]),
        "`message_start` says 0 input tokens: the provider tells them only at the end, and "
        "`message_delta` carries them (the SDK's final usage is right)",
    ),
    Lossy(
        "stop-sequence-reason",
        "stop reasons",
        _pairs([CHAT, RESPONSES], PROVIDERS),
        "an answer that stopped at a stop sequence reads as a natural end (the client's "
        "format has no such stop reason)",
    ),
    Lossy(
        "no-stop-sequences",
        "stop reasons",
        _pairs([CHAT, ANTHROPIC], ["openai-responses"]),
        "stop sequences are dropped: Responses has no such field",
    ),
    Lossy(
        "refused-fields",
        "unmapped fields",
        _pairs([CHAT, RESPONSES], ["anthropic"]),
        "forwarded as sent, and Anthropic refuses fields it does not know, such as OpenAI's "
        "`seed` or `store`: the client gets Anthropic's 400, in its own shape",
    ),
]


def lossy(key: str, client: str, provider: str) -> bool:
    """Whether the pair loses what ``LOSSY[key]`` says (and the test must see the loss)."""
    (note,) = [n for n in LOSSY if n.key == key]
    return (client, provider) in note.pairs


# -- the gateway --------------------------------------------------------------------


@dataclass
class Caller:
    """One test's key, SDK clients and records."""

    gw: Gateway
    fake: Any
    key: str
    key_id: int
    sdks: dict[str, Any]
    call_id: str = ""

    def ask(
        self, client: str, body: dict, stream: bool = False, script: str = ""
    ) -> tuple[p.Answer, dict]:
        """Make a call; return what the SDK parsed and what the upstream received."""
        self.call_id = uuid.uuid4().hex
        headers = {"X-Fake-Script": f"id={self.call_id};{script}"}
        answer = p.call(client, self.sdks[client], body, stream, headers)
        (sent,) = self.sent()
        return answer, sent

    def sent(self) -> list[dict]:
        """What the upstream received for the latest call."""
        return self.fake.log(self.call_id)

    def records(self, count: int) -> list[dict]:
        rows = self.gw.wait_final(count, apiKeyId=self.key_id)
        # In the order the calls came: ids follow the order the recorder wrote them in,
        # and a stream's record is written once its client's copy has ended.
        return sorted(rows, key=lambda r: (r["createdAt"], r["id"]))


@pytest.fixture(scope="module")
def models(module_gateway: Gateway, fake) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """A system name per provider type, all on the fake upstream."""
    for provider in PROVIDERS:
        module_gateway.setup_route(fake.url, provider_type=provider, system_name=f"pair-{provider}")
    return {provider: f"pair-{provider}" for provider in PROVIDERS}


@pytest.fixture
def caller(module_gateway: Gateway, fake) -> Caller:  # type: ignore[no-untyped-def]
    key = module_gateway.api("POST", "/apiKey", json={"comment": "pairs"})
    url = module_gateway.url
    sdks = {
        CHAT: openai.OpenAI(base_url=f"{url}/v1", api_key=key["key"], max_retries=0),
        ANTHROPIC: anthropic.Anthropic(base_url=url, api_key=key["key"], max_retries=0),
    }
    sdks[RESPONSES] = sdks[CHAT]
    return Caller(module_gateway, fake, key["key"], key["id"], sdks)


# -- a full tool cycle: image, tools and reasoning asked; reasoning, text, calls answered

TEXT, REASONING = "tok0 tok1 tok2 ", "think0 think1 "
CALLS = [("call_0", "tool_0", {"n": 0}), ("call_1", "tool_1", {"n": 1})]
STOPS = {  # (tool use, end of turn, token limit) in each client's words
    CHAT: ("tool_calls", "stop", "length"),
    ANTHROPIC: ("tool_use", "end_turn", "max_tokens"),
    RESPONSES: ("completed", "completed", "incomplete"),
}
ASKED = [("user", [("text", p.ASK), ("image", p.PNG)])]
RECORDED_PROMPT = [
    {"role": "system", "content": p.SYSTEM},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": p.ASK},
            {"type": "image_url", "image_url": {"url": p.DATA_URL}},
        ],
    },
]
RECORDED_TOOLS = [
    {"type": "function", "function": {"name": n, "description": d, "parameters": p.PARAMETERS}}
    for n, d in p.TOOLS
]


RECORDED_ANSWER = {  # tool-call arguments parsed: their spacing differs by provider
    "role": "assistant",
    "content": TEXT,
    "reasoning_content": REASONING,
    "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in CALLS
    ],
}


def parsed_arguments(messages: list[dict]) -> list[dict]:
    """Recorded messages with their tool-call arguments parsed."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": json.loads(c["function"]["arguments"]),
                    },
                }
                for c in message["tool_calls"]
            ]
        out.append(message)
    return out


@covers("text", "streaming", "tools", "reasoning", "images", "usage", "stop reasons")
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_tool_cycle(
    caller: Caller, models: dict, client: str, provider: str, stream: bool
) -> None:
    upstream = UPSTREAM[provider]
    body = p.request(client, models[provider])
    first, sent = caller.ask(client, body, stream, "reasoning=2;chunks=3;tools=2;cache=1")

    # What the SDK parsed.
    assert (first.text, first.reasoning, first.calls) == (TEXT, REASONING, CALLS)
    assert first.stop == STOPS[client][0]
    assert first.usage == (sent["usage"]["input_tokens"], 9, 1)
    if client == ANTHROPIC:
        assert first.signature == (
            "" if lossy("unsigned-thinking", client, provider) else "sig-fake"
        )
        if stream:
            late = lossy("late-input-tokens", client, provider)
            assert first.start_input == (0 if late else sent["usage"]["input_tokens"])
    if client == CHAT and stream:  # numbered from 0 among tool calls, id and name first
        assert [t for t in first.tool_chunks if t[1]] == [
            (0, "call_0", "tool_0"),
            (1, "call_1", "tool_1"),
        ]
        assert {t[0] for t in first.tool_chunks} == {0, 1}

    # What the upstream received, in its own protocol.
    seen = p.received(upstream, sent["body"])
    assert (seen["system"], seen["turns"], seen["tools"]) == (p.SYSTEM, ASKED, ["tool_0", "tool_1"])
    assert (seen["choice"], seen["max_tokens"]) == ("auto", p.MAX_TOKENS)
    assert seen["reasoning"] == (2048 if upstream == ANTHROPIC else "low")
    assert sent["body"].get("stream", False) == stream

    # The tool results go back with the SDK's own assistant turn.
    second, sent2 = caller.ask(
        client, p.with_results(client, body, first), stream, "chunks=2;cache=1"
    )
    assert (second.text, second.calls, second.stop) == ("tok0 tok1 ", [], STOPS[client][1])
    assert second.usage == (sent2["usage"]["input_tokens"], 2, 1)
    replayed = not lossy("reasoning-not-replayed", client, provider)
    assistant = [("reasoning",)] if replayed else []
    assistant += [("text", TEXT), *(("call", *c) for c in CALLS)]
    results = [("result", i, p.RESULTS[n], ()) for i, n, _ in CALLS]
    assert p.received(upstream, sent2["body"])["turns"] == [
        *ASKED,
        ("assistant", assistant),
        ("user", results),
    ]

    # The record: the same whatever the pair, with the upstream's own counts.
    one, two = caller.records(2)
    for row, log, output in ((one, sent, 9), (two, sent2, 2)):
        assert row["status"] == "completed" and row["error"] is None
        assert (row["promptTokens"], row["completionTokens"]) == (
            log["usage"]["input_tokens"],
            output,
        )
        assert row["usage"]["cache_read_tokens"] == 1
        assert row["apiFormat"] == client and row["stream"] is stream
        assert row["prompt"]["tools"] == RECORDED_TOOLS and row["prompt"]["tool_choice"] == "auto"
        assert row["prompt"]["params"]["max_tokens"] == p.MAX_TOKENS
        assert 0 <= row["ttft"] <= row["duration"]
    assert one["usage"]["reasoning_tokens"] == (None if upstream == ANTHROPIC else 2)
    assert one["prompt"]["messages"] == RECORDED_PROMPT
    assert parsed_arguments(one["completion"]) == [RECORDED_ANSWER]
    assert parsed_arguments(two["prompt"]["messages"]) == [
        *RECORDED_PROMPT,
        RECORDED_ANSWER,
        *({"role": "tool", "tool_call_id": i, "content": p.RESULTS[n]} for i, n, _ in CALLS),
    ]
    assert two["completion"] == [{"role": "assistant", "content": "tok0 tok1 "}]


# -- the rest of the features ---------------------------------------------------------


@covers("stop reasons")
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("finish", ["length", "stop_sequence"])
def test_an_answer_that_stops_early(
    caller: Caller, models: dict, client: str, provider: str, stream: bool, finish: str
) -> None:
    stop = {CHAT: {"stop": ["###"]}, ANTHROPIC: {"stop_sequences": ["###"]}, RESPONSES: {}}
    body = p.request(client, models[provider], tools=False, **stop[client])
    answer, sent = caller.ask(client, body, stream, f"chunks=2;finish={finish}")
    seen = p.received(UPSTREAM[provider], sent["body"])
    dropped = lossy("no-stop-sequences", client, provider)
    assert seen["stop"] == (None if client == RESPONSES or dropped else ["###"])
    assert answer.text == "tok0 tok1 "
    if finish == "length":
        assert answer.stop == STOPS[client][2]
    elif client != ANTHROPIC:
        assert lossy("stop-sequence-reason", client, provider)
        assert answer.stop == STOPS[client][1]  # a stop sequence reads as a natural end
    elif UPSTREAM[provider] == RESPONSES:  # it cannot say why it stopped
        assert (answer.stop, answer.stop_sequence) == ("end_turn", None)
    else:
        assert (answer.stop, answer.stop_sequence) == ("stop_sequence", "###")
    (row,) = caller.records(1)
    assert row["status"] == "completed" and row["completion"][0]["content"] == "tok0 tok1 "
    assert row["completionTokens"] == 2


CHOICES = {  # auto, none, required, one named tool: in each client's words
    CHAT: ["auto", "none", "required", {"type": "function", "function": {"name": "tool_1"}}],
    ANTHROPIC: [
        {"type": "auto"},
        {"type": "none"},
        {"type": "any"},
        {"type": "tool", "name": "tool_1"},
    ],
    RESPONSES: ["auto", "none", "required", {"type": "function", "name": "tool_1"}],
}


@covers("tool choice")
def test_every_tool_choice(caller: Caller, models: dict, client: str, provider: str) -> None:
    seen = []
    for choice in CHOICES[client]:
        body = {**p.request(client, models[provider]), "tool_choice": choice}
        _, sent = caller.ask(client, body, script="chunks=1")
        seen.append(p.received(UPSTREAM[provider], sent["body"])["choice"])
    assert seen == ["auto", "none", "required", "tool_1"]
    rows = caller.records(4)
    assert [r["prompt"]["tool_choice"] for r in rows] == CHOICES[CHAT]


UNMAPPED = {  # a field the client's own API knows and the gateway does not map
    CHAT: {"seed": 7},
    ANTHROPIC: {"metadata": {"user_id": "u-1"}},
    RESPONSES: {"store": False},
}


@covers("text", "unmapped fields")
def test_fields_without_a_mapping_are_forwarded(
    caller: Caller, models: dict, client: str, provider: str
) -> None:
    body = p.request(client, models[provider], tools=False, extra_body=UNMAPPED[client])
    if client == CHAT:
        body["messages"][1]["name"] = "alice"
    if lossy("refused-fields", client, provider):
        error = anthropic.BadRequestError if client == ANTHROPIC else openai.BadRequestError
        with pytest.raises(error, match="Extra inputs are not permitted"):
            caller.ask(client, body, script="chunks=1")
    else:
        caller.ask(client, body, script="chunks=1")
    (sent,) = caller.sent()
    assert {k: sent["body"].get(k) for k in UNMAPPED[client]} == UNMAPPED[client]
    if client == CHAT:
        dropped = lossy("message-name", client, provider)
        assert ('"alice"' in json.dumps(sent["body"])) is not dropped
    (row,) = caller.records(1)
    assert row["prompt"]["extraBody"] == UNMAPPED[client]


def _image_in_a_tool_result(client: str, model: str) -> dict:
    body = p.request(client, model)
    image = {"type": "base64", "media_type": "image/png", "data": p.PNG}
    if client == ANTHROPIC:
        call = {"type": "tool_use", "id": "call_9", "name": "tool_0", "input": {"n": 9}}
        result = {
            "type": "tool_result",
            "tool_use_id": "call_9",
            "content": [{"type": "text", "text": "here"}, {"type": "image", "source": image}],
        }
        turns = [{"role": "assistant", "content": [call]}, {"role": "user", "content": [result]}]
        return {**body, "messages": [*body["messages"], *turns]}
    call = {"type": "function_call", "call_id": "call_9", "name": "tool_0", "arguments": '{"n": 9}'}
    output = [
        {"type": "input_text", "text": "here"},
        {"type": "input_image", "image_url": p.DATA_URL},
    ]
    result = {"type": "function_call_output", "call_id": "call_9", "output": output}
    return {**body, "input": [*body["input"], call, result]}


@covers("images", pairs=[(c, q) for c, q in PAIRS if c != CHAT])
def test_an_image_in_a_tool_result(
    caller: Caller, models: dict, client: str, provider: str
) -> None:
    body = _image_in_a_tool_result(client, models[provider])
    _, sent = caller.ask(client, body, script="chunks=1")
    turns = p.received(UPSTREAM[provider], sent["body"])["turns"]
    assert turns[:2] == [*ASKED, ("assistant", [("call", "call_9", "tool_0", {"n": 9})])]
    if lossy("tool-result-images", client, provider):
        assert turns[2:] == [("user", [("result", "call_9", "here", ()), ("image", p.PNG)])]
    else:
        assert turns[2:] == [("user", [("result", "call_9", "here", (p.PNG,))])]


@covers("text", pairs=[(CHAT, "anthropic"), (RESPONSES, "anthropic")])
def test_anthropic_gets_a_max_tokens_the_client_left_out(
    caller: Caller, models: dict, client: str, provider: str
) -> None:
    body = p.request(client, models[provider], tools=False)
    for name in ("max_tokens", "max_output_tokens", "reasoning_effort", "reasoning"):
        body.pop(name, None)  # a thinking budget would raise the default
    _, sent = caller.ask(client, body, script="chunks=1")
    assert sent["body"]["max_tokens"] == 4096


PATHS = {CHAT: "/v1/chat/completions", ANTHROPIC: "/v1/messages", RESPONSES: "/v1/responses"}


def sse_events(data: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE event, read strictly: LF-separated, one data line."""
    events = []
    for chunk in data.decode().split("\n\n"):
        if not chunk or chunk.startswith(":"):  # the end, or a keep-alive comment
            continue
        fields = dict(line.split(": ", 1) for line in chunk.split("\n"))
        assert set(fields) <= {"event", "data"}, chunk
        events.append((fields.get("event"), fields["data"]))
    return events


@covers("streaming", "usage")
def test_each_stream_is_framed_as_its_protocol_says(
    caller: Caller, models: dict, client: str, provider: str
) -> None:
    call_id = uuid.uuid4().hex
    resp = requests.post(
        caller.gw.url + PATHS[client],
        json={**p.request(client, models[provider]), "stream": True},
        headers={
            "Authorization": f"Bearer {caller.key}",
            "X-Fake-Script": f"id={call_id};reasoning=1;chunks=2;tools=1",
        },
        timeout=10,
    )
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(resp.content)
    (sent,) = caller.fake.log(call_id)
    input_tokens, output_tokens = sent["usage"]["input_tokens"], 5
    if client == CHAT:  # data lines only, one id, no usage chunk unless asked, then [DONE]
        assert {name for name, _ in events} == {None} and events[-1][1] == "[DONE]"
        chunks = [json.loads(data) for _, data in events[:-1]]
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(c["choices"] and c.get("usage") is None for c in chunks)
        return
    bodies = [json.loads(data) for _, data in events]
    assert [name for name, _ in events] == [b["type"] for b in bodies]  # event: matches type
    if client == ANTHROPIC:
        assert (bodies[0]["type"], bodies[-1]["type"]) == ("message_start", "message_stop")
        late = lossy("late-input-tokens", client, provider)
        start = bodies[0]["message"]["usage"]["input_tokens"]
        assert start == (0 if late else input_tokens)
        (delta,) = [b for b in bodies if b["type"] == "message_delta"]
        assert delta["usage"]["output_tokens"] == output_tokens
        assert delta["usage"].get("input_tokens", start) == input_tokens
    else:
        assert [b["sequence_number"] for b in bodies] == list(range(len(bodies)))
        assert (bodies[0]["type"], bodies[-1]["type"]) == ("response.created", "response.completed")
        usage = bodies[-1]["response"]["usage"]
        assert (usage["input_tokens"], usage["output_tokens"]) == (input_tokens, output_tokens)


IMAGE_URL = "https://images.test/paris.png"


@covers("images")
def test_an_image_by_url(caller: Caller, models: dict, client: str, provider: str) -> None:
    body = p.request(client, models[provider], tools=False)
    if client == CHAT:
        body["messages"][1]["content"][1] = {"type": "image_url", "image_url": {"url": IMAGE_URL}}
    elif client == ANTHROPIC:
        image = {"type": "image", "source": {"type": "url", "url": IMAGE_URL}}
        body["messages"][0]["content"][1] = image
    else:  # the object form some Responses clients send (NexusGate issue #62)
        body["input"][0]["content"][1] = {"type": "input_image", "image_url": {"url": IMAGE_URL}}
    _, sent = caller.ask(client, body, script="chunks=1")
    turns = p.received(UPSTREAM[provider], sent["body"])["turns"]
    assert turns == [("user", [("text", p.ASK), ("image", IMAGE_URL)])]
    (row,) = caller.records(1)
    assert row["prompt"]["messages"][1]["content"][1]["image_url"] == {"url": IMAGE_URL}


@covers("streaming", "errors")
def test_an_upstream_error_mid_stream(
    caller: Caller, models: dict, client: str, provider: str
) -> None:
    body = p.request(client, models[provider], tools=False)
    headers = {"X-Fake-Script": "chunks=2;error_event=1"}
    sdk = caller.sdks[client]
    if client == CHAT:
        with pytest.raises(openai.APIError, match="fake upstream failure"):
            list(sdk.chat.completions.create(**body, stream=True, extra_headers=headers))
    elif client == ANTHROPIC:
        with pytest.raises(anthropic.APIError, match="fake upstream failure"):
            list(sdk.messages.create(**body, stream=True, extra_headers=headers))
    else:
        events = list(sdk.responses.create(**body, stream=True, extra_headers=headers))
        errors = [e for e in events if e.type == "error"]
        assert [e.message for e in errors] == ["fake upstream failure"]
        if UPSTREAM[provider] != RESPONSES:  # relayed as sent when the formats match
            assert events[-1].type == "response.failed"
    (row,) = caller.records(1)
    assert row["status"] == "failed" and "fake upstream failure" in row["error"]
    assert row["completion"][0]["content"] == "tok0 tok1 "


@covers("errors")
def test_an_upstream_refusal(caller: Caller, models: dict, client: str, provider: str) -> None:
    body = p.request(client, models[provider], tools=False)
    headers = {"X-Fake-Script": "status=400"}
    if client == ANTHROPIC:
        with pytest.raises(anthropic.BadRequestError) as info:
            caller.sdks[client].messages.create(**body, extra_headers=headers)
        assert info.value.body["type"] == "error"
        assert info.value.body["error"]["message"] == "fake error 400"
    else:
        with pytest.raises(openai.BadRequestError) as info:
            if client == CHAT:
                caller.sdks[client].chat.completions.create(**body, extra_headers=headers)
            else:
                caller.sdks[client].responses.create(**body, extra_headers=headers)
        assert info.value.body["message"] == "fake error 400"
    (row,) = caller.records(1)
    assert row["status"] == "failed" and "HTTP 400" in row["error"]


# -- the README's compatibility matrix ------------------------------------------------

CLIENT_NAMES = {CHAT: "Chat Completions", ANTHROPIC: "Anthropic Messages", RESPONSES: "Responses"}
MARKS = "¹²³⁴⁵⁶⁷⁸⁹"
BEGIN = "<!-- compatibility matrix: generated by `python -m tests.test_server_pairs` -->"
END = "<!-- end of compatibility matrix -->"


def matrix() -> str:
    """The matrix as Markdown: a row per pair, a column per feature, the notes below."""
    lines = [
        "| client | provider | " + " | ".join(FEATURES) + " |",
        "|---|---|" + "---|" * len(FEATURES),
    ]
    for client, provider in PAIRS:
        cells = []
        for feature in FEATURES:
            tested = any(
                feature in features and (client, provider) in pairs
                for features, pairs in _COVERAGE.values()
            )
            marks = "".join(
                MARKS[i]
                for i, note in enumerate(LOSSY)
                if note.feature == feature and (client, provider) in note.pairs
            )
            cells.append(f"✓{marks}" if tested else "not tested")
        lines.append(f"| {CLIENT_NAMES[client]} | `{provider}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {MARKS[i]} {note.text}." for i, note in enumerate(LOSSY)]
    return "\n".join(lines).rstrip()


def test_readme_matrix() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert BEGIN in readme and END in readme, "the README lost its matrix markers"
    current = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert current == matrix(), "README matrix is stale: python -m tests.test_server_pairs"


if __name__ == "__main__":
    print(f"{BEGIN}\n{matrix()}\n{END}")
