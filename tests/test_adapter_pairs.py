"""Every client protocol with every upstream protocol: requests, answers, streams, SDKs.

Round trips go through our own parsers; the SDK tests hand our rendered bytes to the
official ``openai`` and ``anthropic`` clients (offline, through a mock transport) and
read what they accumulated, which catches format mistakes a round trip cannot.
"""

from __future__ import annotations

import json

import anthropic as anthropic_sdk
import openai
import pytest

from gateway.adapters import PROTOCOLS, ir
from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from tests.adapter_support import (
    ASK,
    CONVERSATIONS,
    PNG,
    WEATHER_PARAMETERS,
    accumulate,
    anthropic_client,
    json_frames,
    openai_client,
    parse_stream,
    render_stream,
    stream_bytes,
    summary,
)

FORMATS = [OPENAI_CHAT, ANTHROPIC, OPENAI_RESPONSES]
PAIRS = [(client, upstream) for client in FORMATS for upstream in FORMATS]
UPSTREAM_STREAMS = [
    (OPENAI_CHAT, "openai_chat_tools.sse"),
    (OPENAI_CHAT, "openai_chat_vllm_length.sse"),
    (ANTHROPIC, "anthropic_thinking.sse"),
    (ANTHROPIC, "anthropic_late_input.sse"),
    (OPENAI_RESPONSES, "responses_reasoning.sse"),
    (OPENAI_RESPONSES, "responses_incomplete.sse"),
]


def client_request(client: str) -> dict:
    """The shared conversation as a client IR request; chat clients ask for stream usage."""
    body = dict(CONVERSATIONS[client])
    if client == OPENAI_CHAT:
        body["stream_options"] = {"include_usage": True}
    return PROTOCOLS[client].parse_request(body)


def through(client: str, expected: dict) -> dict:
    """What a client format can say of an answer: the parts it has no words for change."""
    expected = {**expected, "usage": dict(expected["usage"])}
    if client != ANTHROPIC and expected["stop_reason"] == "stop_sequence":
        expected["stop_reason"] = "end_turn"  # chat and Responses have no stop-sequence reason
    usage = expected["usage"]
    if client == OPENAI_RESPONSES and usage["input_tokens"] is not None:
        for name in ("cache_read_tokens", "reasoning_tokens"):
            usage[name] = usage[name] or 0  # required integers in Responses usage
    return expected


# --- requests ------------------------------------------------------------------------


def normal_form(request: dict) -> dict:
    """The meaning of a request that every protocol can carry (reasoning aside)."""

    def block(b: dict) -> tuple:
        if b["type"] == "text":
            return ("text", b["text"])
        if b["type"] == "image":
            return ("image", b["source"]["type"], b["source"].get("data") or b["source"].get("url"))
        if b["type"] == "tool_call":
            return ("call", b["id"], b["name"], json.loads(b["arguments"]))
        return ("result", b["tool_call_id"], tuple(block(c) for c in b["content"]), b["is_error"])

    messages: list[list] = []
    for message in request["messages"]:
        blocks = [block(b) for b in message["content"] if b["type"] != "reasoning"]
        if messages and messages[-1][0] == message["role"]:
            messages[-1][1].extend(blocks)  # consecutive turns of one role are one turn
        else:
            messages.append([message["role"], blocks])
    return {
        "system": ir.text_of(request["system"]),
        "messages": messages,
        "tools": [(t["name"], t["description"], t["parameters"]) for t in request["tools"]],
        "tool_choice": request["tool_choice"],
        "max_tokens": request["max_tokens"],
        "temperature": request["temperature"],
        "stream": request["stream"],
    }


EXPECTED_MEANING = {
    "system": "You are a weather bot.",
    "messages": [
        ["user", [("text", ASK), ("image", "base64", PNG)]],
        [
            "assistant",
            [("text", "Let me check."), ("call", "call_1", "get_weather", {"city": "Paris"})],
        ],
        [
            "user",
            [
                ("result", "call_1", (("text", "18°C, sunny"),), False),
                ("text", "Thanks! And Tokyo?"),
            ],
        ],
    ],
    "tools": [("get_weather", "Weather for a city", WEATHER_PARAMETERS)],
    "tool_choice": {"type": "auto"},
    "max_tokens": 512,
    "temperature": 0.5,
    "stream": True,
}


@pytest.mark.parametrize(("client", "upstream"), PAIRS)
def test_request_keeps_its_meaning_upstream(client, upstream):
    request = client_request(client)
    assert normal_form(request) == EXPECTED_MEANING
    built = PROTOCOLS[upstream].build_request(request, "up-model")
    assert built["model"] == "up-model"
    # What we send must itself be a valid request of the upstream's protocol, saying the same.
    assert normal_form(PROTOCOLS[upstream].parse_request(built)) == EXPECTED_MEANING


@pytest.mark.parametrize(("client", "upstream"), PAIRS)
def test_request_specifics_of_each_upstream(client, upstream):
    built = PROTOCOLS[upstream].build_request(client_request(client), "up-model")
    if upstream == OPENAI_CHAT:
        assert built["stream_options"] == {"include_usage": True}
        assert built["max_tokens"] == 512
        assert built["messages"][0] == {"role": "system", "content": "You are a weather bot."}
        assert built["messages"][2]["reasoning_content"] == "Need the tool."
        assert built["tool_choice"] == "auto"
    elif upstream == ANTHROPIC:
        assert (built["max_tokens"], built["system"], built["tool_choice"]) == (
            512,
            "You are a weather bot.",
            {"type": "auto"},
        )
        thinking = [b for b in built["messages"][1]["content"] if b["type"] == "thinking"]
        # Only Anthropic's own signature can be replayed to Anthropic.
        assert thinking == (
            [{"type": "thinking", "thinking": "Need the tool.", "signature": "sig-1"}]
            if client == ANTHROPIC
            else []
        )
    else:
        assert (built["instructions"], built["max_output_tokens"], built["tool_choice"]) == (
            "You are a weather bot.",
            512,
            "auto",
        )
        assert built["tools"][0]["strict"] is False
        reasoning = [item for item in built["input"] if item["type"] == "reasoning"]
        expected = [
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "Need the tool."}],
                "encrypted_content": "enc-1",
            }
        ]
        assert reasoning == (expected if client == OPENAI_RESPONSES else [])


# Structured output as each OpenAI format spells it: the same schema, named and strict.
PLACE = {"type": "object", "properties": {"city": {"type": "string"}}}
STRUCTURED = {
    OPENAI_CHAT: {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "place", "schema": PLACE, "strict": True},
        },
        "verbosity": "low",
    },
    OPENAI_RESPONSES: {
        "text": {
            "format": {"type": "json_schema", "name": "place", "schema": PLACE, "strict": True},
            "verbosity": "low",
        }
    },
}
JSON_OBJECT = {
    OPENAI_CHAT: {"response_format": {"type": "json_object"}},
    OPENAI_RESPONSES: {"text": {"format": {"type": "json_object"}}},
}


@pytest.mark.parametrize(
    ("client", "upstream"), [(OPENAI_CHAT, OPENAI_RESPONSES), (OPENAI_RESPONSES, OPENAI_CHAT)]
)
@pytest.mark.parametrize("spelled", [STRUCTURED, JSON_OBJECT])
def test_structured_output_goes_as_the_upstream_spells_it(client, upstream, spelled):
    """``response_format`` is Responses' ``text.format``: under its own name, one OpenAI
    format's field is refused by the other's API (or ignored: the answer is free text)."""
    body = {**CONVERSATIONS[client], **spelled[client]}
    built = PROTOCOLS[upstream].build_request(PROTOCOLS[client].parse_request(body), "up")
    assert {k: built.get(k) for k in spelled[upstream]} == spelled[upstream]
    assert not (set(spelled[client]) - set(spelled[upstream])) & set(built)


# --- streams -------------------------------------------------------------------------


@pytest.mark.parametrize("client", FORMATS)
@pytest.mark.parametrize(("upstream", "name"), UPSTREAM_STREAMS)
def test_stream_round_trip(upstream, name, client):
    events = parse_stream(upstream, stream_bytes(name))
    original = accumulate(events).result()
    rendered = render_stream(client, events, client_request(client))
    back = accumulate(parse_stream(client, rendered))
    assert back.terminal and back.error is None
    result = back.result()
    assert summary(result) == through(client, summary(original))
    if client != OPENAI_CHAT:  # chat has no place for signatures
        signatures = [
            b.get("signature")
            for b in original["content"]
            if b["type"] == "reasoning" and b.get("text")
        ]
        assert [
            b.get("signature")
            for b in result["content"]
            if b["type"] == "reasoning" and b.get("text")
        ] == signatures


def test_chat_client_that_did_not_ask_gets_no_usage():
    events = parse_stream(ANTHROPIC, stream_bytes("anthropic_thinking.sse"))
    request = PROTOCOLS[OPENAI_CHAT].parse_request({**CONVERSATIONS[OPENAI_CHAT]})
    chunks = json_frames(render_stream(OPENAI_CHAT, events, request))
    assert all("usage" not in c for c in chunks)


# --- non-streaming answers -----------------------------------------------------------

UPSTREAM_BODIES = {
    OPENAI_CHAT: {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "deepseek-reasoner",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Checking.",
                    "reasoning_content": "Use the tool.",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}}],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 90, "completion_tokens": 40, "total_tokens": 130,
                  "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 12}},
    },
    ANTHROPIC: {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "thinking", "thinking": "Use the tool.", "signature": "sig-2"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Tokyo"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 50, "output_tokens": 40},
    },
    OPENAI_RESPONSES: {
        "id": "resp_1",
        "object": "response",
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "model": "o4-mini",
        "output": [
            {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "Use the tool."}], "encrypted_content": "enc-2"},
            {"id": "msg_1", "type": "message", "role": "assistant", "status": "incomplete", "content": [{"type": "output_text", "text": "Check", "annotations": []}]},
        ],
        "usage": {"input_tokens": 90, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 40,
                  "output_tokens_details": {"reasoning_tokens": 38}, "total_tokens": 130},
    },
}  # fmt: skip


@pytest.mark.parametrize(("client", "upstream"), PAIRS)
def test_answer_round_trip(client, upstream):
    original = PROTOCOLS[upstream].parse_response(UPSTREAM_BODIES[upstream])
    rendered = PROTOCOLS[client].render_response(original, client_request(client))
    back = PROTOCOLS[client].parse_response(json.loads(json.dumps(rendered)))
    assert summary(back) == through(client, summary(original))


# --- the real SDKs -------------------------------------------------------------------


def sdk_stream_answer(client: str, data: bytes) -> dict:
    """Let the client's SDK accumulate a rendered stream; read its final object back."""
    if client == OPENAI_CHAT:
        chat = openai_client(data).chat.completions
        with chat.stream(model="weather", messages=[{"role": "user", "content": "hi"}]) as stream:
            try:
                final = stream.get_final_completion()
            except openai.LengthFinishReasonError as cut:  # the helper's way to say "length"
                final = cut.completion
        return PROTOCOLS[client].parse_response(final.to_dict())
    if client == ANTHROPIC:
        sdk = anthropic_client(data)
        with sdk.messages.stream(
            model="weather", max_tokens=512, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            final = stream.get_final_message()
        return PROTOCOLS[client].parse_response(final.to_dict())
    with openai_client(data).responses.stream(model="weather", input="hi") as stream:
        events = list(stream)
    terminal = events[-1]
    assert terminal.type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == terminal.response.output_text
    return PROTOCOLS[client].parse_response(terminal.response.to_dict())


@pytest.mark.parametrize("client", FORMATS)
@pytest.mark.parametrize(("upstream", "name"), UPSTREAM_STREAMS)
def test_sdk_reads_our_streams(upstream, name, client):
    events = parse_stream(upstream, stream_bytes(name))
    data = render_stream(client, events, client_request(client))
    answer = sdk_stream_answer(client, data)
    assert summary(answer) == through(client, summary(accumulate(events).result()))


@pytest.mark.parametrize(("client", "upstream"), PAIRS)
def test_sdk_reads_our_answers(client, upstream):
    answer = PROTOCOLS[upstream].parse_response(UPSTREAM_BODIES[upstream])
    body = json.dumps(PROTOCOLS[client].render_response(answer, client_request(client))).encode()
    if client == OPENAI_CHAT:
        final = openai_client(body, stream=False).chat.completions.create(
            model="weather", messages=[]
        )
    elif client == ANTHROPIC:
        final = anthropic_client(body, stream=False).messages.create(
            model="weather", max_tokens=9, messages=[]
        )
    else:
        final = openai_client(body, stream=False).responses.create(model="weather", input="hi")
    assert summary(PROTOCOLS[client].parse_response(final.to_dict())) == through(
        client, summary(answer)
    )


def sdk_events(client: str, data: bytes) -> list:
    """Iterate a raw stream with the client's SDK (raising whatever the SDK raises)."""
    if client == OPENAI_CHAT:
        return list(
            openai_client(data).chat.completions.create(model="m", messages=[], stream=True)
        )
    if client == ANTHROPIC:
        return list(
            anthropic_client(data).messages.create(
                model="m", max_tokens=9, messages=[], stream=True
            )
        )
    return list(openai_client(data).responses.create(model="m", input="hi", stream=True))


STREAM_ERROR = {"type": "error", "message": "upstream broke", "error_type": "api_error"}


@pytest.mark.parametrize(
    ("client", "sdk_error"), [(OPENAI_CHAT, openai.APIError), (ANTHROPIC, anthropic_sdk.APIError)]
)
def test_sdks_raise_on_our_stream_errors(client, sdk_error):
    start = parse_stream(OPENAI_CHAT, stream_bytes("openai_chat_tools.sse"))[:6]
    with pytest.raises(sdk_error, match="upstream broke"):
        sdk_events(client, render_stream(client, [*start, STREAM_ERROR], {}))


def test_responses_sdk_sees_the_error_and_the_failed_response():
    start = parse_stream(OPENAI_CHAT, stream_bytes("openai_chat_tools.sse"))[:6]
    events = sdk_events(
        OPENAI_RESPONSES, render_stream(OPENAI_RESPONSES, [*start, STREAM_ERROR], {})
    )
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].message == "upstream broke"
    assert events[-1].response.error.message == "upstream broke"


def test_sdks_on_a_relayed_stream_cut_by_stream_error():
    # Same-format relays pass upstream bytes on, then append the module's error frames.
    chat = stream_bytes("openai_chat_tools.sse").split(b"data: [DONE]")[0]
    cut_chat = chat[: chat.index(b'"finish_reason":"tool_calls"')].rsplit(b"\n\n", 1)[0] + b"\n\n"
    with pytest.raises(openai.APIError, match="cut"):
        sdk_events(OPENAI_CHAT, cut_chat + PROTOCOLS[OPENAI_CHAT].stream_error("cut"))
    cut_anthropic = stream_bytes("anthropic_thinking.sse").split(b"event: content_block_stop")[0]
    with pytest.raises(anthropic_sdk.APIError, match="overloaded_error"):
        sdk_events(
            ANTHROPIC, cut_anthropic + PROTOCOLS[ANTHROPIC].stream_error("cut", "overloaded_error")
        )
    cut_responses = stream_bytes("responses_reasoning.sse").split(
        b"event: response.output_item.done"
    )[0]
    relayed = cut_responses + PROTOCOLS[OPENAI_RESPONSES].stream_error("cut", sequence_number=99)
    last = sdk_events(OPENAI_RESPONSES, relayed)[-1]
    assert (last.type, last.message, last.sequence_number) == ("error", "cut", 99)
