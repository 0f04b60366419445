"""The stream translator, fed literal upstream events: what the client gets, what the call learns.

Covers what the server tests never reach: a usage-only chunk after the finish, an error
event, a stream without its terminal event, CRLF framing relayed byte for byte, an
upstream that keeps talking after its end, and what each piece carries.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import sse
from gateway.adapters import PROTOCOLS, ir, record, wire
from gateway.adapters.translator import BrokenStream, Piece, StreamTranslator
from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from tests.adapter_support import frames, json_frames, render_stream, stream_bytes
from tests.fuzz_support import FUZZ

REQUEST = {"model": "m", "stream": True, "stream_usage": False}


def chunk(delta: dict | None = None, finish: str | None = None, **extra: object) -> bytes:
    """One Chat Completions chunk as an upstream frames it."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return sse.encode(json.dumps({"id": "chatcmpl-up", "model": "m", "choices": choices, **extra}))


USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
CHAT_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "hm"}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo"}),
    chunk({}, "stop"),
    chunk(None, usage=USAGE),  # the usage-only chunk, after the finish
    sse.encode("[DONE]"),
]


def run(translator: StreamTranslator, raw: bytes) -> list[Piece]:
    """Decode ``raw`` and feed every event; the finish last."""
    decoder = sse.Decoder()
    events = decoder.feed(raw) + decoder.flush()
    return [translator.feed(event) for event in events] + [translator.finish()]


def test_same_format_relays_the_upstream_bytes_and_hides_the_usage_chunk() -> None:
    translator = StreamTranslator(OPENAI_CHAT, OPENAI_CHAT, REQUEST)
    pieces = run(translator, b"".join(CHAT_STREAM))
    sent = b"".join(p.data for p in pieces)
    assert sent == b"".join(c for c in CHAT_STREAM if b'"choices": []' not in c)
    # ...and the record still has the usage it carried.
    response = translator.response()
    assert response["usage"] == ir.usage(input_tokens=7, output_tokens=2)
    assert response["id"] == "chatcmpl-up"  # the upstream's id reaches the record
    assert ir.text_of(response["content"]) == "Hello"


def test_a_client_that_asked_for_usage_gets_the_usage_chunk() -> None:
    translator = StreamTranslator(OPENAI_CHAT, OPENAI_CHAT, {**REQUEST, "stream_usage": True})
    assert b"".join(p.data for p in run(translator, b"".join(CHAT_STREAM))) == b"".join(CHAT_STREAM)


def test_pieces_say_what_they_carry_and_when_the_first_token_and_the_end_came() -> None:
    pieces = run(StreamTranslator(OPENAI_CHAT, OPENAI_CHAT, REQUEST), b"".join(CHAT_STREAM))
    assert [p.events for p in pieces] == [1, 1, 1, 1, 1, 0, 1, 0]
    assert [p.text for p in pieces] == ["", "", "Hel", "lo", "", "", "", ""]
    assert [p.first_token for p in pieces] == [
        False,
        True,
        False,
        False,
        False,
        False,
        False,
        False,
    ]
    assert [p.terminal for p in pieces] == [False] * 6 + [True, False]


def test_crlf_framed_events_are_relayed_byte_for_byte() -> None:
    raw = b"".join(CHAT_STREAM).replace(b"\n", b"\r\n")
    translator = StreamTranslator(OPENAI_CHAT, OPENAI_CHAT, {**REQUEST, "stream_usage": True})
    decoder = sse.Decoder()
    # Split mid-CRLF on purpose: a CR ends one piece and its LF starts the next.
    cut = raw.index(b"\r\n\r\n") + 3
    events = decoder.feed(raw[:cut]) + decoder.feed(raw[cut:]) + decoder.flush()
    assert b"".join(translator.feed(e).data for e in events) + translator.finish().data == raw
    assert translator.terminal


def test_comments_and_pings_go_through_but_are_not_events() -> None:
    translator = StreamTranslator(OPENAI_CHAT, OPENAI_CHAT, REQUEST)
    (comment,) = frames(b": keep-alive\n\n")
    piece = translator.feed(comment)
    assert piece == Piece(b": keep-alive\n\n", events=0)
    assert translator.response() is None  # the upstream has said nothing yet


def test_different_formats_are_rendered_for_the_client() -> None:
    translator = StreamTranslator(ANTHROPIC, OPENAI_CHAT, REQUEST)
    pieces = run(translator, b"".join(CHAT_STREAM))
    sent = b"".join(p.data for p in pieces)
    kinds = [e.event for e in frames(sent)]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert sum(p.events for p in pieces) == len(kinds)
    assert "".join(p.text for p in pieces) == "Hello"
    # The usage told after the finish reaches the client in message_delta, not a chunk of its own.
    assert json_frames(sent)[-2]["usage"]["output_tokens"] == 2
    assert pieces[-2].terminal and translator.terminal


@pytest.mark.parametrize("client", [ANTHROPIC, OPENAI_RESPONSES])
def test_text_with_a_lone_surrogate_or_nul_is_rendered_as_it_came(client: str) -> None:
    # Valid JSON escapes an upstream may send; a lone surrogate has no UTF-8, so the
    # client's frames keep it escaped rather than failing the call.
    odd = "a\ud800b\x00c\U0001f600"
    stream = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": odd}),
        *CHAT_STREAM[4:],
    ]
    pieces = run(StreamTranslator(client, OPENAI_CHAT, REQUEST), b"".join(stream))
    assert "".join(p.text for p in pieces) == odd
    sent = b"".join(p.data for p in pieces)
    assert odd in _strings(json_frames(sent))  # decodes back to the very same text


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [text for item in items for text in _strings(item)]


def test_an_error_event_ends_the_client_stream_once() -> None:
    translator = StreamTranslator(OPENAI_RESPONSES, OPENAI_CHAT, REQUEST)
    error = sse.encode(json.dumps({"error": {"message": "overloaded", "type": "server_error"}}))
    pieces = run(translator, chunk({"content": "Hi"}) + error)
    assert translator.error == {"message": "overloaded", "type": "server_error"}
    assert not translator.terminal
    kinds = [e.event for e in frames(b"".join(p.data for p in pieces))]
    assert kinds[-2:] == ["error", "response.failed"]
    assert pieces[-1] == Piece()  # the finish adds nothing: the client's stream has ended
    assert translator.fail("Upstream failed mid-stream: reset") == Piece()


def test_a_stream_without_its_terminal_event_ends_with_an_error_for_the_client() -> None:
    translator = StreamTranslator(OPENAI_CHAT, OPENAI_CHAT, REQUEST)
    *_, last = run(translator, chunk({"content": "Hi"}))
    assert not translator.terminal and translator.error is None
    assert last.events == 2  # the error chunk, then [DONE]
    (error,) = json_frames(last.data)
    assert error["error"]["message"] == "Upstream ended the stream before its end"
    assert last.data.endswith(b"data: [DONE]\n\n")


def test_a_failure_after_the_terminal_event_sends_nothing_more() -> None:
    translator = StreamTranslator(OPENAI_CHAT, OPENAI_CHAT, REQUEST)
    run(translator, b"".join(CHAT_STREAM))
    assert translator.fail("The gateway ended the call: gateway shutdown") == Piece()


def test_a_failure_mid_stream_sends_the_client_protocols_error_frames() -> None:
    translator = StreamTranslator(ANTHROPIC, ANTHROPIC, REQUEST)
    piece = translator.fail("Upstream failed mid-stream: reset")
    assert [e.event for e in frames(piece.data)] == ["error"] and piece.events == 1
    assert translator.fail("again") == Piece()


def test_a_failure_of_a_rendered_stream_ends_it_as_the_renderer_numbered_it() -> None:
    translator = StreamTranslator(OPENAI_RESPONSES, OPENAI_CHAT, REQUEST)
    sent = b"".join(p.data for p in [translator.feed(e) for e in _events(chunk({"content": "Hi"}))])
    piece = translator.fail("Upstream failed mid-stream: reset")
    numbers = [json.loads(e.data)["sequence_number"] for e in frames(sent + piece.data)]
    assert numbers == list(range(len(numbers)))  # the error numbers on; the SDK resumes by them
    assert [e.event for e in frames(piece.data)] == ["error", "response.failed"]


def test_a_failure_of_a_relayed_responses_stream_numbers_on_from_the_upstream() -> None:
    translator = StreamTranslator(OPENAI_RESPONSES, OPENAI_RESPONSES, REQUEST)
    created = {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1"}}
    progress = {**created, "type": "response.in_progress", "sequence_number": 1}
    for data in (created, progress):
        translator.feed(sse.Event(event=data["type"], data=json.dumps(data)))
    (error,) = json_frames(translator.fail("Upstream failed mid-stream: reset").data)
    assert error["type"] == "error" and error["sequence_number"] == 2


@pytest.mark.parametrize("protocol", [OPENAI_CHAT, ANTHROPIC, OPENAI_RESPONSES])
def test_an_event_that_is_not_json_breaks_the_stream_before_it_reaches_the_client(
    protocol: str,
) -> None:
    translator = StreamTranslator(protocol, protocol, REQUEST)
    with pytest.raises(BrokenStream, match="not JSON"):
        translator.feed(sse.Event(event="message", data='{"choices": [{"delta": {"cont'))
    assert translator.response() is None  # nothing of it was taken for the answer


def _events(raw: bytes) -> list[sse.Event]:
    decoder = sse.Decoder()
    return decoder.feed(raw) + decoder.flush()


def test_whatever_an_upstream_sends_after_its_end_is_not_rendered() -> None:
    translator = StreamTranslator(ANTHROPIC, OPENAI_CHAT, REQUEST)
    run(translator, b"".join(CHAT_STREAM))
    late = sse.Event(data=json.dumps({"choices": [{"index": 0, "delta": {"content": "x"}}]}))
    assert translator.feed(late) == Piece()


@pytest.mark.parametrize(
    ("stream", "protocol", "text", "terminal"),
    [
        ("anthropic_thinking.sse", ANTHROPIC, True, True),
        ("responses_reasoning.sse", OPENAI_RESPONSES, True, True),
        ("openai_chat_vllm_length.sse", OPENAI_CHAT, True, True),
    ],
)
def test_recorded_streams_relay_unchanged_and_parse_whole(
    stream: str, protocol: str, text: bool, terminal: bool
) -> None:
    raw = stream_bytes(stream)
    translator = StreamTranslator(protocol, protocol, {**REQUEST, "stream_usage": True})
    pieces = run(translator, raw)
    assert b"".join(p.data for p in pieces) == raw
    assert sum(p.first_token for p in pieces) == 1
    assert translator.terminal is terminal
    assert bool("".join(p.text for p in pieces)) is text
    assert "".join(p.text for p in pieces) == ir.text_of(translator.response()["content"])


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        ("text/event-stream", True),
        ("text/event-stream; charset=utf-8", True),
        ("", True),
        ("application/json", False),
        ("application/problem+json", False),
    ],
)
def test_a_json_answer_to_a_streaming_request_is_not_a_stream(
    content_type: str, accepted: bool
) -> None:
    assert StreamTranslator.accepts(content_type) is accepted


# --- Hostile upstreams ---------------------------------------------------------------

_WORDS = [
    *("text", "text_delta", "thinking_delta", "input_json_delta", "tool_use", "assistant"),
    *("message_start", "content_block_start", "content_block_delta", "end_turn", "stop"),
    "response.output_text.delta",
]
_KEYS = [
    *("type", "index", "delta", "text", "choices", "content", "content_block", "message"),
    *("usage", "finish_reason", "tool_calls", "function", "arguments", "id", "name", "role"),
    *("partial_json", "thinking", "item", "output_index", "response", "output", "error"),
    *("stop_reason", "input_tokens", "output_tokens", "prompt_tokens", "sequence_number"),
    *("item_id", "content_index", "code", "message"),
]
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 3), st.text(max_size=3), st.sampled_from(_WORDS)
)
_hostile_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=2), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)
_hostile_events = st.lists(
    st.tuples(
        st.one_of(
            st.none(),
            st.sampled_from(
                [
                    *("message_start", "content_block_start", "content_block_delta"),
                    *("message_delta", "response.output_text.delta", "response.completed"),
                    "error",
                ]
            ),
        ),
        st.dictionaries(st.sampled_from(_KEYS), _hostile_values, max_size=5),
    ),
    max_size=6,
)
_FORMATS = list(PROTOCOLS)  # every client and upstream format, in every pair


@settings(FUZZ, max_examples=1500)
@given(events=_hostile_events, client=st.sampled_from(_FORMATS), upstream=st.sampled_from(_FORMATS))
def test_any_json_an_upstream_streams_is_relayed_or_a_broken_stream(events, client, upstream):
    # JSON in shapes no protocol has (a list where an index goes, a number for a delta)
    # is the upstream's fault, as non-JSON is: BrokenStream, never an error of the
    # gateway's own (which records the call as the gateway's failure). The client's
    # stream can always be ended, and the answer so far read for the record.
    translator = StreamTranslator(client, upstream, {"stream": True, "stream_usage": True})
    try:
        for name, data in events:
            translator.feed(sse.Event(event=name, data=json.dumps(data)))
        translator.finish()
    except BrokenStream:
        translator.fail("Upstream failed mid-stream")  # nothing if an error event ended it
    translator.response()


@pytest.mark.parametrize(
    ("protocol", "body", "said"),
    [
        (OPENAI_CHAT, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota"}}, "insufficient_quota: You exceeded your current quota"),
        (OPENAI_CHAT, {"object": "error", "message": "model overloaded", "type": "server_error"}, "model overloaded"),
        (OPENAI_CHAT, {"error": "bad gateway"}, "bad gateway"),
        (ANTHROPIC, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "overloaded_error: Overloaded"),
        (OPENAI_RESPONSES, {"id": "resp_1", "status": "failed", "output": [], "error": {"code": "server_error", "message": "The model failed"}}, "server_error: The model failed"),
        (OPENAI_RESPONSES, {"error": {"message": "Invalid key"}}, "Invalid key"),
    ],
)  # fmt: skip
def test_an_error_answered_with_a_2xx_status_is_no_answer(protocol, body, said):
    # Some servers and proxies answer an error with 200: it was recorded completed, with
    # an empty answer, and a client of another format got a made-up success.
    with pytest.raises(wire.ErrorAnswer, match=re.escape(said)):
        PROTOCOLS[protocol].parse_response(body)


def test_an_answer_that_carries_an_empty_error_field_is_an_answer():
    chat = {"choices": [{"message": {"role": "assistant", "content": "hi"}}], "error": None}
    assert PROTOCOLS[OPENAI_CHAT].parse_response(chat)["content"][0]["text"] == "hi"
    done = {"status": "completed", "error": None, "output": []}
    assert PROTOCOLS[OPENAI_RESPONSES].parse_response(done)["stop_reason"] == "end_turn"


# -- what hostile upstreams sent (a probe, 2026-12-06), each red before its fix ---------


@pytest.mark.parametrize("upstream", [OPENAI_CHAT, ANTHROPIC, OPENAI_RESPONSES])
@pytest.mark.parametrize("client", [OPENAI_CHAT, ANTHROPIC, OPENAI_RESPONSES])
def test_a_keep_alive_of_blank_data_is_neither_relayed_nor_a_broken_stream(upstream, client):
    # `data: ` alone: relayed to a client of the same format, its SDK failed reading it
    # as JSON while the record said completed; an Anthropic or Responses upstream's
    # stream failed as "not JSON" halfway.
    answer = {**ir.empty_response(), "id": "up_1", "model": "m", "stop_reason": "end_turn"}
    answer["content"] = [{"type": "text", "text": "one two"}]
    whole = render_stream(upstream, ir.stream_events(answer), {"model": "m", "stream_usage": True})
    first_end = whole.index(b"\n\n") + 2
    raw = whole[:first_end] + b"data: \n\n" + b"event: ping\ndata:  \n\n" + whole[first_end:]
    translator = StreamTranslator(client, upstream, {"stream": True, "stream_usage": True})
    sent = b"".join(piece.data for piece in run(translator, raw))
    assert b"data: \n\n" not in sent and b"data:  \n" not in sent
    assert translator.terminal
    assert ir.text_of(translator.response()["content"]) == "one two"
    if client == upstream:
        assert sent == whole  # the rest, byte for byte


def test_a_streamed_refusal_is_the_answers_text() -> None:
    # It reached a Chat client (relayed), but the record had no text, and an Anthropic
    # client got none.
    raw = (
        chunk({"role": "assistant", "refusal": ""})
        + chunk({"refusal": "I can't "})
        + chunk({"refusal": "help with that."})
        + chunk({}, "stop")
        + sse.encode("[DONE]")
    )
    for client in (OPENAI_CHAT, ANTHROPIC):
        translator = StreamTranslator(client, OPENAI_CHAT, REQUEST)
        pieces = run(translator, raw)
        assert "".join(p.text for p in pieces) == "I can't help with that."
        assert ir.text_of(translator.response()["content"]) == "I can't help with that."


def _call(index: int, arguments: str, name: str | None = None) -> dict:
    call: dict = {"index": index, "function": {"arguments": arguments}}
    if name is not None:
        call.update(id=f"call_{name}", type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


INTERLEAVED = [
    chunk({"role": "assistant", "content": None, **_call(0, "", "fa")}),
    chunk(_call(1, "", "fb")),
    chunk(_call(0, '{"x"')),
    chunk(_call(1, '{"y"')),
    chunk(_call(0, ":1}")),
    chunk(_call(1, ":2}")),
    chunk({}, "tool_calls"),
    sse.encode("[DONE]"),
]


@pytest.mark.parametrize("client", [OPENAI_CHAT, ANTHROPIC, OPENAI_RESPONSES])
def test_parallel_tool_calls_whose_pieces_interleave_stay_two_whole_calls(client: str) -> None:
    # A Responses client got three calls (one nameless), an Anthropic client a delta
    # after its block had stopped.
    translator = StreamTranslator(client, OPENAI_CHAT, REQUEST)
    sent = b"".join(p.data for p in run(translator, b"".join(INTERLEAVED)))
    calls = [
        (b["name"], b["arguments"])
        for b in translator.response()["content"]
        if b["type"] == "tool_call"
    ]
    assert calls == [("fa", '{"x":1}'), ("fb", '{"y":2}')]
    if client == ANTHROPIC:
        stopped: set[int] = set()
        for frame in json_frames(sent):
            if frame["type"] == "content_block_stop":
                stopped.add(frame["index"])
            if frame["type"] == "content_block_delta":
                assert frame["index"] not in stopped, "a delta after its block stopped"
        inputs = [
            f["content_block"]["name"]
            for f in json_frames(sent)
            if f["type"] == "content_block_start"
        ]
        assert inputs == ["fa", "fb"]
    if client == OPENAI_RESPONSES:
        done = next(f for f in json_frames(sent) if f["type"] == "response.completed")
        items = [(i["name"], i["arguments"]) for i in done["response"]["output"]]
        assert items == [("fa", '{"x":1}'), ("fb", '{"y":2}')]


def test_parallel_tool_calls_one_after_another_are_two_calls_without_indexes() -> None:
    # Servers that omit the index send one call at a time: the second one, held while
    # the first streams, must not take a number another call has.
    raw = b"".join(
        [
            chunk(
                {"tool_calls": [{"id": "call_a", "function": {"name": "fa", "arguments": "{}"}}]}
            ),
            chunk({"tool_calls": [{"id": "call_b", "function": {"name": "fb", "arguments": "{"}}]}),
            chunk({"tool_calls": [{"function": {"arguments": "}"}}]}),
            chunk(
                {"tool_calls": [{"id": "call_c", "function": {"name": "fc", "arguments": "[]"}}]}
            ),
            chunk({}, "tool_calls"),
            sse.encode("[DONE]"),
        ]
    )
    translator = StreamTranslator(ANTHROPIC, OPENAI_CHAT, REQUEST)
    run(translator, raw)
    calls = [(b["id"], b["arguments"]) for b in translator.response()["content"]]
    assert calls == [("call_a", "{}"), ("call_b", "{}"), ("call_c", "[]")]


@pytest.mark.parametrize("client", [OPENAI_CHAT, OPENAI_RESPONSES])
def test_an_anthropic_tool_call_whose_input_came_whole_at_its_start_keeps_it(client: str) -> None:
    # `input: {}` at content_block_start, then an empty partial_json: Chat and Responses
    # clients got "" (not JSON), and so did the record; the JSON path said "{}".
    events = [
        ("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    raw = b"".join(sse.encode(json.dumps(data), event=name) for name, data in events)
    translator = StreamTranslator(client, ANTHROPIC, REQUEST)
    sent = b"".join(p.data for p in run(translator, raw))
    (call,) = [b for b in translator.response()["content"] if b["type"] == "tool_call"]
    assert call["arguments"] == "{}"
    if client == OPENAI_CHAT:
        pieces = [
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
            for c in json_frames(sent)
            if c.get("choices") and c["choices"][0]["delta"].get("tool_calls")
        ]
        assert "".join(pieces) == "{}"


def test_tool_arguments_sent_as_an_object_are_taken_as_their_json_text() -> None:
    # Some OpenAI-compatible servers send the object itself: an Anthropic client got a
    # 500 (json.loads of a dict), a Responses client an object where a string goes.
    body = {
        "id": "chatcmpl-1",
        "choices": [
            {
                "message": {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
                "finish_reason": "tool_calls",
            }
        ],
    }  # fmt: skip
    resp = PROTOCOLS[OPENAI_CHAT].parse_response(body)
    assert resp["content"][0]["arguments"] == '{"a":1}'
    assert PROTOCOLS[ANTHROPIC].render_response(resp, {"model": "m"})["content"][0]["input"] == {
        "a": 1
    }
    raw = chunk(
        {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": {"a": 1}}}]}
    )
    translator = StreamTranslator(ANTHROPIC, OPENAI_CHAT, REQUEST)
    run(translator, raw + chunk({}, "tool_calls") + sse.encode("[DONE]"))
    assert translator.response()["content"][0]["arguments"] == '{"a":1}'


@pytest.mark.parametrize(
    ("upstream", "first", "said"),
    [
        (OPENAI_CHAT, sse.Event(data='{"error": {"type": "server_error", "message": "overloaded"}}'), "server_error: overloaded"),
        (ANTHROPIC, sse.Event(event="error", data='{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'), "overloaded_error: Overloaded"),
        (OPENAI_RESPONSES, sse.Event(event="response.failed", data='{"type": "response.failed", "response": {"error": {"code": "server_error", "message": "The model failed"}}}'), "The model failed"),
    ],
)  # fmt: skip
def test_a_stream_whose_first_event_is_an_error_is_refused_in_the_upstreams_words(
    upstream, first, said
):
    translator = StreamTranslator(OPENAI_CHAT, upstream, REQUEST)
    refusal = translator.refusal(first)
    assert refusal is not None and refusal.startswith(
        "the upstream answered an error with a 2xx status ("
    )
    assert said in refusal
    # ...and the translator's own parser has not read it: the stream is untouched.
    assert translator.response() is None


def test_a_first_event_that_is_no_error_is_not_refused() -> None:
    translator = StreamTranslator(OPENAI_CHAT, OPENAI_CHAT, REQUEST)
    (first,) = frames(chunk({"role": "assistant", "content": "the error was mine"}))
    assert translator.refusal(first) is None
    assert translator.refusal(sse.Event(data="not json, an error")) is None


def test_every_choice_a_client_asked_for_is_recorded() -> None:
    # With n=2 the client got both choices (relayed), the record only the first.
    def piece(index: int, delta: dict, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        return sse.encode(json.dumps({"id": "chatcmpl-n", "model": "m", "choices": [choice]}))

    raw = b"".join(
        [
            piece(0, {"role": "assistant", "content": ""}),
            piece(1, {"role": "assistant", "content": ""}),
            piece(0, {"content": "AA"}),
            piece(1, {"content": "BB"}),
            piece(1, {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]}),
            piece(0, {"content": "A"}, "stop"),
            piece(1, {}, "tool_calls"),
            chunk(None, usage=USAGE),
            sse.encode("[DONE]"),
        ]
    )  # fmt: skip
    translator = StreamTranslator(OPENAI_CHAT, OPENAI_CHAT, {**REQUEST, "n": 2})
    pieces = run(translator, raw)
    assert b"".join(p.data for p in pieces) == raw.replace(
        b"".join([chunk(None, usage=USAGE)]), b""
    )
    response = translator.response()
    assert record.completion(response) == [
        {"role": "assistant", "content": "AAA"},
        {
            "role": "assistant",
            "content": "BB",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
    ]  # fmt: skip
    assert response["usage"] == ir.usage(input_tokens=7, output_tokens=2)
    body = {
        "id": "chatcmpl-j",
        "choices": [
            {"index": 1, "message": {"role": "assistant", "content": "BBB"}, "finish_reason": "stop"},
            {"index": 0, "message": {"role": "assistant", "content": "AAA"}, "finish_reason": "stop"},
        ],
    }  # fmt: skip
    answer = PROTOCOLS[OPENAI_CHAT].parse_response(body)
    assert ir.text_of(answer["content"]) == "AAA"
    assert [m["content"] for m in record.completion(answer)] == ["AAA", "BBB"]
    one = PROTOCOLS[OPENAI_CHAT].parse_response({"choices": [body["choices"][1] | {"index": 0}]})
    assert "more" not in one and len(record.completion(one)) == 1


@pytest.mark.parametrize("client", [OPENAI_CHAT, ANTHROPIC])
def test_nothing_an_upstream_sends_after_its_terminal_event_reaches_the_record(client):
    # In the same read as message_stop: more text, and a message_delta saying 999
    # output tokens. The client got neither; the record kept both, and TPM was charged
    # 999 (a probe). Arriving a moment later, they were dropped.
    events = [
        ("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "A B "}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
        ("message_stop", {"type": "message_stop"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "LATE "}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 999}}),
    ]  # fmt: skip
    raw = b"".join(sse.encode(json.dumps(data), event=name) for name, data in events)
    translator = StreamTranslator(client, ANTHROPIC, REQUEST)
    pieces = run(translator, raw)
    assert all(p == Piece() for p in pieces[-3:-1])  # the two after the end
    response = translator.response()
    assert ir.text_of(response["content"]) == "A B " and response["usage"]["output_tokens"] == 3


INTERLEAVED_WITH_TEXT = [
    chunk({"role": "assistant", "content": None, **_call(0, '{"a":', "f0")}),
    chunk(_call(1, '{"b":', "f1")),
    chunk({"content": "between"}),
    chunk(_call(0, "1}")),
    chunk(_call(1, "2}")),
    chunk({}, "tool_calls"),
    sse.encode("[DONE]"),
]


@pytest.mark.parametrize("client", [ANTHROPIC, OPENAI_RESPONSES])
def test_text_between_interleaved_tool_calls_waits_with_them(client: str) -> None:
    # The text closed the first call and let the held one go as a whole block; the
    # calls' later pieces went to blocks that had stopped: four broken calls for a
    # Responses client, deltas after their stop for an Anthropic one (a probe).
    translator = StreamTranslator(client, OPENAI_CHAT, REQUEST)
    sent = b"".join(p.data for p in run(translator, b"".join(INTERLEAVED_WITH_TEXT)))
    content = translator.response()["content"]
    assert [(b["type"], b.get("name"), b.get("arguments") or b.get("text")) for b in content] == [
        ("tool_call", "f0", '{"a":1}'),
        ("tool_call", "f1", '{"b":2}'),
        ("text", None, "between"),
    ]
    frames = json_frames(sent)
    if client == ANTHROPIC:
        stopped: set[int] = set()
        for frame in frames:
            if frame["type"] == "content_block_stop":
                stopped.add(frame["index"])
            elif frame["type"] == "content_block_delta":
                assert frame["index"] not in stopped, "a delta after its block stopped"
    else:
        done = next(f for f in frames if f["type"] == "response.completed")
        calls = [
            (i["name"], i["arguments"])
            for i in done["response"]["output"]
            if i["type"] == "function_call"
        ]
        assert calls == [("f0", '{"a":1}'), ("f1", '{"b":2}')]


def test_a_repeat_of_a_call_with_several_choices_gets_them_all() -> None:
    # The record held both choices, a repeat (JSON or streamed) only the first.
    answer = {**ir.empty_response(), "id": "chatcmpl-n", "model": "m", "stop_reason": "end_turn"}
    answer["content"] = [{"type": "text", "text": "AAA"}]
    answer["more"] = [[{"type": "text", "text": "BBB"}]]
    body = PROTOCOLS[OPENAI_CHAT].render_response(answer, {"model": "m"})
    assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [
        (0, "AAA"),
        (1, "BBB"),
    ]
    piece = StreamTranslator.replay(OPENAI_CHAT, {"model": "m", "stream": True}, answer)
    texts: dict[int, str] = {}
    for frame in json_frames(piece.data):
        for choice in frame["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (
                choice["delta"].get("content") or ""
            )
    assert texts == {0: "AAA", 1: "BBB"}
    # ...and a client of a format with no place for them gets the first.
    other = StreamTranslator.replay(ANTHROPIC, {"model": "m", "stream": True}, answer)
    assert b"BBB" not in other.data and b"AAA" in other.data


@pytest.mark.parametrize(
    ("upstream", "event", "data", "opening"),
    [
        (ANTHROPIC, "message_start", '{"type":"message_start","message":{}}', False),
        (ANTHROPIC, "ping", '{"type": "ping"}', False),
        (ANTHROPIC, None, '{"type": "ping"}', False),  # no event line: its data says
        (ANTHROPIC, "content_block_start", '{"type":"content_block_start","index":0}', True),
        (ANTHROPIC, "error", '{"type":"error","error":{"type":"overloaded_error"}}', True),
        (OPENAI_RESPONSES, "response.created", '{"type":"response.created"}', False),
        (OPENAI_RESPONSES, "response.in_progress", '{"type":"response.in_progress"}', False),
        (OPENAI_RESPONSES, "response.output_item.added", '{"type":"x"}', True),
        (OPENAI_RESPONSES, "response.failed", '{"type":"response.failed"}', True),
        # A chat stream's first chunk opens it: holding it would delay every first byte.
        (OPENAI_CHAT, None, '{"choices":[{"delta":{"role":"assistant"}}]}', True),
        (OPENAI_CHAT, None, " ", False),  # a keep-alive, in every protocol
    ],
)
def test_what_opens_a_stream_commits_the_call_to_its_upstream(
    upstream: str, event: str | None, data: str, opening: bool
) -> None:
    translator = StreamTranslator(OPENAI_CHAT, upstream, REQUEST)
    assert translator.preface(sse.Event(data=data, event=event)) is not opening


@pytest.mark.parametrize("upstream", [OPENAI_CHAT, ANTHROPIC, OPENAI_RESPONSES])
def test_an_event_nested_past_what_json_reads_is_a_broken_stream(upstream: str) -> None:
    # json.loads's RecursionError went past the translator: the client's stream never
    # ended and its record stayed pending (a probe, 2026-12-07).
    deep = sse.Event(
        event="message_start", data='{"type": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    translator = StreamTranslator(OPENAI_CHAT, upstream, REQUEST)
    translator.preface(deep)  # no RecursionError from either, before the first byte
    assert translator.refusal(deep) is None
    with pytest.raises(BrokenStream):
        translator.feed(deep)


@pytest.mark.parametrize(
    ("upstream", "answer"),
    [
        (OPENAI_CHAT, {"choices": [], "usage": {"prompt_tokens": 12.0, "completion_tokens": 3.0, "prompt_tokens_details": {"cached_tokens": 2.5}}}),
        (ANTHROPIC, {"content": [], "usage": {"input_tokens": 12.0, "output_tokens": 3.0, "cache_read_input_tokens": 2.5}}),
        (OPENAI_RESPONSES, {"status": "completed", "output": [], "usage": {"input_tokens": 12.0, "output_tokens": 3.0, "input_tokens_details": {"cached_tokens": 2.5}}}),
    ],
)  # fmt: skip
def test_a_count_written_as_a_whole_float_is_that_count(upstream: str, answer: dict) -> None:
    # JSON has one kind of number: 12.0 is 12 (a server in JavaScript cannot tell them
    # apart). A probe (2026-12-07) found both counts unknown, and so the cost, and TPM
    # charged nothing. A count with a fraction is no count.
    usage = PROTOCOLS[upstream].parse_response(answer)["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (12, 3)
    assert type(usage["input_tokens"]) is int and usage["cache_read_tokens"] is None
    assert wire.count(2.0**31) is None and wire.count(-1.0) is None and wire.count(1e300) is None
