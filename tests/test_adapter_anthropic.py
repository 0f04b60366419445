"""Anthropic Messages adapter: requests, answers and streams, shape by shape."""

from __future__ import annotations

import json

import pytest

from gateway.adapters import anthropic, ir
from gateway.adapters.anthropic.request import DEFAULT_MAX_TOKENS
from gateway.errors import InvalidRequest
from tests.adapter_support import accumulate, frames, json_frames, parse_stream, stream_bytes

USER = {"role": "user", "content": "hi"}
B64 = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def body(**fields):
    return {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [USER], **fields}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def reasoning(text_: str = "", signature=None, redacted=None) -> dict:
    return {"type": "reasoning", "text": text_, "signature": signature, "redacted": redacted}


# --- parse_request -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        ("Be brief.", [text("Be brief.")]),
        ([text("One."), {**text("Two."), "cache_control": {"type": "ephemeral"}}],
         [text("One."), {**text("Two."), "cache_control": {"type": "ephemeral"}}]),
    ],
)  # fmt: skip
def test_system_string_or_blocks(system, expected):
    assert anthropic.parse_request(body(system=system))["system"] == expected


def test_full_tool_cycle_with_thinking_images_and_cache_control():
    ir_req = anthropic.parse_request(
        body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        text("What is here?"),
                        {"type": "image", "source": B64},
                        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Check weather.", "signature": "sig1"},
                        {"type": "redacted_thinking", "data": "opaque"},
                        text("Checking."),
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Paris"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "is_error": True,
                            "content": [text("map:"), {"type": "image", "source": B64}],
                            "cache_control": {"type": "ephemeral"},
                        },
                        text("thanks"),
                    ],
                },
            ]
        )
    )
    user, assistant, results = ir_req["messages"]
    assert user["content"] == [
        text("What is here?"),
        {"type": "image", "source": B64, "detail": None},
        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}, "detail": None},
    ]
    assert assistant["content"] == [
        reasoning("Check weather.", "sig1"),
        reasoning(redacted="opaque"),
        text("Checking."),
        {
            "type": "tool_call",
            "id": "toolu_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
    ]
    assert results["content"] == [
        {
            "type": "tool_result",
            "tool_call_id": "toolu_1",
            "content": [text("sunny")],
            "is_error": False,
        },
        {
            "type": "tool_result",
            "tool_call_id": "toolu_2",
            "content": [text("map:"), {"type": "image", "source": B64, "detail": None}],
            "is_error": True,
            "cache_control": {"type": "ephemeral"},
        },
        text("thanks"),
    ]


@pytest.mark.parametrize(
    ("wire", "choice", "parallel"),
    [
        ({"type": "auto"}, {"type": "auto"}, None),
        ({"type": "any"}, {"type": "required"}, None),
        ({"type": "none"}, {"type": "none"}, None),
        ({"type": "tool", "name": "get_weather"}, {"type": "tool", "name": "get_weather"}, None),
        ({"type": "auto", "disable_parallel_tool_use": True}, {"type": "auto"}, False),
        ({"type": "any", "disable_parallel_tool_use": False}, {"type": "required"}, True),
    ],
)
def test_every_tool_choice_form(wire, choice, parallel):
    ir_req = anthropic.parse_request(body(tools=[WEATHER], tool_choice=wire))
    assert (ir_req["tool_choice"], ir_req["parallel_tool_calls"]) == (choice, parallel)
    rebuilt = anthropic.build_request(ir_req, "up")["tool_choice"]
    assert rebuilt == {
        k: v for k, v in wire.items() if (k, v) != ("disable_parallel_tool_use", False)
    }


def test_thinking_config_and_fields():
    ir_req = anthropic.parse_request(
        body(
            thinking={"type": "enabled", "budget_tokens": 2048},
            stop_sequences=["###"],
            temperature=1,
            top_p=0.9,
            top_k=40,
            stream=True,
            metadata={"user_id": "u1"},
            service_tier="auto",
        )
    )
    assert ir_req["reasoning"] == {"effort": None, "budget_tokens": 2048, "summary": None}
    assert (ir_req["stop"], ir_req["temperature"], ir_req["top_p"], ir_req["top_k"]) == (
        ["###"],
        1,
        0.9,
        40,
    )
    assert ir_req["stream"] is True and ir_req["stream_usage"] is True
    assert ir_req["extra"] == {"metadata": {"user_id": "u1"}, "service_tier": "auto"}
    assert anthropic.parse_request(body(thinking={"type": "disabled"}))["reasoning"] is None
    adaptive = anthropic.parse_request(body(thinking={"type": "adaptive"}))
    assert adaptive["reasoning"] is None and adaptive["extra"] == {"thinking": {"type": "adaptive"}}


def test_the_edges_of_every_range_are_accepted():
    ir_req = anthropic.parse_request(
        body(max_tokens=2**31 - 1, temperature=1, top_p=0, top_k=0, metadata={"user_id": "u"})
    )
    assert (ir_req["max_tokens"], ir_req["temperature"], ir_req["top_p"], ir_req["top_k"]) == (
        2**31 - 1,
        1,
        0,
        0,
    )
    assert ir_req["extra"] == {"metadata": {"user_id": "u"}}
    budget = {"type": "enabled", "budget_tokens": 2**31 - 1}
    assert anthropic.parse_request(body(thinking=budget))["reasoning"]["budget_tokens"] == 2**31 - 1
    adaptive = {"type": "adaptive"}
    assert anthropic.parse_request(body(thinking=adaptive))["extra"] == {"thinking": adaptive}


@pytest.mark.parametrize(
    ("request_body", "param", "message"),
    [
        ("hi", None, "request body must be a JSON object"),
        ({"max_tokens": 5, "messages": [USER]}, "model", "model is required"),
        ({"model": "m", "messages": [USER]}, "max_tokens", "max_tokens is required"),
        (body(max_tokens="5"), "max_tokens", "max_tokens must be an integer"),
        (body(messages=[]), "messages", "messages must not be empty"),
        ({"model": "m", "max_tokens": 5}, "messages", "messages is required"),
        (body(stream=1), "stream", "stream must be a boolean"),
        (body(temperature=[1]), "temperature", "must be a number"),
        (body(top_k=0.5), "top_k", "must be an integer"),
        (body(stop_sequences="###"), "stop_sequences", "stop_sequences must be an array"),
        (body(stop_sequences="x"), "stop_sequences", "stop_sequences must be an array"),
        (body(stop_sequences=[1]), "stop_sequences[0]", "stop_sequences[0] must be a string"),
        (body(max_tokens=-1), "max_tokens", "max_tokens must be an integer from 0 to 2147483647"),
        (body(max_tokens=10**30), "max_tokens", "from 0 to 2147483647"),
        (body(max_tokens=2**53 + 1), "max_tokens", "from 0 to 2147483647"),
        (body(max_tokens=1e30), "max_tokens", "max_tokens must be an integer"),
        (body(temperature=1.5), "temperature", "temperature must be a number from 0 to 1"),
        (body(temperature=1e308), "temperature", "from 0 to 1"),
        (body(top_p=-0.1), "top_p", "top_p must be a number from 0 to 1"),
        (body(top_k=-1), "top_k", "top_k must be an integer from 0"),
        (body(thinking={"type": 7}), "thinking.type", "thinking.type must be a string"),
        (body(thinking={}), "thinking.type", "thinking.type is required"),
        (body(thinking="on"), "thinking", "thinking must be an object"),
        (body(thinking={"type": "enabled", "budget_tokens": -1}), "thinking.budget_tokens", "from 0"),
        (body(thinking={"type": "enabled", "budget_tokens": "2048"}), "thinking.budget_tokens", "an integer"),
        (body(metadata="x"), "metadata", "metadata must be an object"),
        (body(metadata={"user_id": 5}), "metadata.user_id", "metadata.user_id must be a string"),
        (body(system=[{"type": "text", "text": "s", "cache_control": "ephemeral"}]),
         "system[0].cache_control", "must be an object"),
        (body(tools=[{"name": "f", "input_schema": {}, "cache_control": 1}]), "tools[0].cache_control", "an object"),
        (body(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": []}]}]),
         "messages[0].content[0].cache_control", "must be an object"),
        (body(system=5), "system", "string or an array of text blocks"),
        (body(system=[{"type": "image", "source": B64}]), "system[0].type", "must be 'text'"),
        (body(tools="x"), "tools", "tools must be an array"),
        (body(tools=[{"name": "f"}]), "tools[0].input_schema", "is required"),
        (body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools[0].type", "custom tools only"),
        (body(tool_choice="auto"), "tool_choice", "tool_choice must be an object"),
        (body(tool_choice={"type": "sometimes"}), "tool_choice.type", "must be one of"),
        (body(tool_choice={"type": "tool"}), "tool_choice.name", "is required"),
        (body(thinking={"type": "enabled"}), "thinking.budget_tokens", "is required"),
        (body(messages=[{"role": "system", "content": "x"}]), "messages[0].role", "must be one of"),
        (body(messages=[{"role": "user", "content": None}]), "messages[0].content", "string or an array"),
        (body(messages=[{"role": "user", "content": [{"type": "document"}]}]), "messages[0].content[0].type", "'document'"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]),
         "messages[0].content[0].source.type", "'base64' or 'url'"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}]}]),
         "messages[0].content[0].source.media_type", "is required"),
        (body(messages=[{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]),
         "messages[0].content[0].id", "is required"),
        (body(messages=[{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}]),
         "messages[0].content[0].input", "must be an object"),
        (body(messages=[{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]),
         "messages[0].content[0].tool_use_id", "is required"),
        (body(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}]),
         "messages[0].content[0].content", "string or an array"),
        (body(messages=[{"role": "assistant", "content": [{"type": "thinking", "signature": "s"}]}]),
         "messages[0].content[0].thinking", "is required"),
    ],
)  # fmt: skip
def test_validation_errors_name_the_field(request_body, param, message):
    if message is None:
        anthropic.parse_request(request_body)
        return
    with pytest.raises(InvalidRequest) as caught:
        anthropic.parse_request(request_body)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert message in caught.value.message


# --- build_request -------------------------------------------------------------------

CANONICAL = {
    "model": "up",
    "max_tokens": 2048,
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [text("Weather?"), {"type": "image", "source": B64}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": "sig1"},
                {"type": "redacted_thinking", "data": "opaque"},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [text("a"), text("b")],
                    "is_error": True,
                },
            ],
        },
    ],
    "temperature": 1,
    "stop_sequences": ["###"],
    "stream": True,
    "tools": [{**WEATHER, "cache_control": {"type": "ephemeral"}}],
    "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "metadata": {"user_id": "u1"},
}


def test_anthropic_to_anthropic_round_trip_is_faithful():
    rebuilt = anthropic.build_request(anthropic.parse_request(CANONICAL), "up")
    assert rebuilt == CANONICAL


def test_defaults_and_merging_for_an_ir_from_another_protocol():
    ir_req = anthropic.parse_request(body())
    ir_req["max_tokens"] = None
    ir_req["system"] = [text("a"), text("b")]
    ir_req["messages"] = [
        {"role": "user", "content": [text("hi")]},
        {"role": "user", "content": [text("")]},  # empty text: the API rejects it
        {
            "role": "assistant",
            "content": [
                reasoning("unsigned"),
                text("calling"),
                {"type": "tool_call", "id": "c1", "name": "f", "arguments": "not json"},
            ],
        },
        {"role": "assistant", "content": [{**reasoning("openai", "gAAA"), "id": "rs_1"}]},
        {
            "role": "user",
            "content": [
                text("also"),
                {
                    "type": "tool_result",
                    "tool_call_id": "c1",
                    "content": [text("ok")],
                    "is_error": False,
                },
            ],
        },
        {"role": "user", "content": [text("more")]},
    ]
    built = anthropic.build_request(ir_req, "up")
    assert built["max_tokens"] == DEFAULT_MAX_TOKENS
    assert built["system"] == "a\nb"
    assert built["messages"] == [
        {"role": "user", "content": [text("hi")]},
        {
            "role": "assistant",
            "content": [
                text("calling"),
                {"type": "tool_use", "id": "c1", "name": "f", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "ok"},
                text("also"),
                text("more"),
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ({"type": "none"}, None, {"type": "none"}),
        ({"type": "required"}, None, {"type": "any"}),
        ({"type": "auto"}, False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ({"type": "none"}, False, {"type": "none"}),
        (None, None, None),
    ],
)
def test_tool_choice_to_anthropic(choice, parallel, expected):
    ir_req = anthropic.parse_request(body(tools=[WEATHER]))
    ir_req["tool_choice"], ir_req["parallel_tool_calls"] = choice, parallel
    assert anthropic.build_request(ir_req, "up").get("tool_choice") == expected
    ir_req["tools"] = []
    assert "tool_choice" not in anthropic.build_request(ir_req, "up")


@pytest.mark.parametrize(
    ("max_tokens", "reasoning_", "expected_max", "thinking"),
    [
        (None, {"effort": "medium"}, 8192 + 4096, {"type": "enabled", "budget_tokens": 8192}),
        (None, {"budget_tokens": 2000}, 6096, {"type": "enabled", "budget_tokens": 2000}),
        (4000, {"effort": "high"}, 4000, {"type": "enabled", "budget_tokens": 3999}),
        (1000, {"effort": "low"}, 1000, None),  # no room for the 1024 minimum
        (None, {"effort": "minimal"}, 4096, None),
    ],
)
def test_reasoning_becomes_a_thinking_budget_below_max_tokens(
    max_tokens, reasoning_, expected_max, thinking
):
    ir_req = anthropic.parse_request(body())
    ir_req["max_tokens"] = max_tokens
    ir_req["reasoning"] = {"effort": None, "budget_tokens": None, "summary": None, **reasoning_}
    built = anthropic.build_request(ir_req, "up")
    assert built["max_tokens"] == expected_max
    assert built.get("thinking") == thinking


def test_mapped_fields_win_over_extras():
    ir_req = anthropic.parse_request(body())
    ir_req["extra"] = {"model": "evil", "max_tokens": 1, "messages": [], "top_k": 3}
    built = anthropic.build_request(ir_req, "up")
    assert (built["model"], built["max_tokens"], built["top_k"]) == ("up", 1024, 3)
    assert built["messages"] == [{"role": "user", "content": [text("hi")]}]


# --- parse_response / render_response -----------------------------------------------

MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [
        {"type": "thinking", "thinking": "Hm.", "signature": "sig"},
        {"type": "redacted_thinking", "data": "opaque"},
        text("Calling."),
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, "é"]}},
        {"type": "server_tool_use", "id": "srv_1", "name": "web_search", "input": {}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 50,
        "cache_creation_input_tokens": 20,
        "cache_read_input_tokens": 30,
        "output_tokens": 12,
    },
}


def test_parse_response_adds_cache_tokens_to_input():
    resp = anthropic.parse_response(MESSAGE)
    assert resp["content"] == [
        reasoning("Hm.", "sig"),
        reasoning(redacted="opaque"),
        text("Calling."),
        {"type": "tool_call", "id": "toolu_1", "name": "f", "arguments": '{"a":[1,"é"]}'},
    ]
    assert resp["stop_reason"] == "tool_use"
    assert resp["usage"] == ir.usage(
        input_tokens=100, output_tokens=12, cache_read_tokens=30, cache_write_tokens=20
    )


def test_counts_that_cannot_be_counts_are_unknown_also_when_summed():
    # Each count alone fits a record's integer column; the input total (cache included)
    # would not. Negative counts and booleans are not counts either.
    usage = {
        "input_tokens": ir.MAX_COUNT,
        "cache_read_input_tokens": 1,
        "output_tokens": -3,
        "cache_creation_input_tokens": True,
    }
    resp = anthropic.parse_response({**MESSAGE, "usage": usage})
    assert resp["usage"] == ir.usage(cache_read_tokens=1)
    fits = {"input_tokens": ir.MAX_COUNT - 1, "cache_read_input_tokens": 1, "output_tokens": 0}
    assert anthropic.parse_response({**MESSAGE, "usage": fits})["usage"] == ir.usage(
        input_tokens=ir.MAX_COUNT, output_tokens=0, cache_read_tokens=1
    )


@pytest.mark.parametrize(
    ("wire", "stop"),
    [("end_turn", "end_turn"), ("max_tokens", "max_tokens"), ("stop_sequence", "stop_sequence"), ("tool_use", "tool_use"),
     ("pause_turn", "pause_turn"), ("refusal", "refusal"), ("model_context_window_exceeded", "max_tokens"), (None, None)],
)  # fmt: skip
def test_stop_reasons(wire, stop):
    assert anthropic.parse_response({**MESSAGE, "stop_reason": wire})["stop_reason"] == stop


def test_render_response_splits_cache_tokens_back_out():
    rendered = anthropic.render_response(anthropic.parse_response(MESSAGE), {"model": "alias"})
    assert rendered["content"] == MESSAGE["content"][:4]
    assert rendered["usage"] == MESSAGE["usage"]
    assert (rendered["type"], rendered["role"], rendered["stop_reason"]) == (
        "message",
        "assistant",
        "tool_use",
    )


def test_render_response_with_foreign_reasoning_and_unknown_usage():
    resp = ir.empty_response()
    resp["content"] = [
        reasoning("from deepseek"),
        {"type": "tool_call", "id": "c", "name": "f", "arguments": "{bad"},
    ]
    resp["stop_reason"] = "content_filter"
    rendered = anthropic.render_response(resp, {"model": "alias"})
    assert rendered["model"] == "alias"
    assert rendered["content"] == [
        {"type": "thinking", "thinking": "from deepseek", "signature": ""},
        {"type": "tool_use", "id": "c", "name": "f", "input": {}},
    ]
    assert rendered["stop_reason"] == "refusal"
    assert rendered["usage"] == {"input_tokens": 0, "output_tokens": 0}  # required integers
    resp["usage"] = ir.usage(input_tokens=9, output_tokens=4, reasoning_tokens=3)
    assert anthropic.render_response(resp, {})["usage"] == {
        "input_tokens": 9,
        "output_tokens": 4,
        "output_tokens_details": {"thinking_tokens": 3},
    }


# --- StreamParser --------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 13])
def test_parser_on_a_recorded_thinking_stream(chunk):
    events = parse_stream("anthropic", stream_bytes("anthropic_thinking.sse"), chunk)
    assert events[0] == {
        "type": "start",
        "id": "msg_01ThinkTools",
        "model": "claude-sonnet-4-5",
        "usage": ir.usage(
            input_tokens=472 + 2048 + 8192, cache_read_tokens=8192, cache_write_tokens=2048
        ),
    }
    result = accumulate(events).result()
    assert result["content"] == [
        reasoning(
            "The user asks for Paris weather. I should call get_weather.",
            "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds+zz+y1J5BYAs0BKLbv3U2V7x6n4Q==",
        ),
        reasoning(
            redacted="EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpPkNRj2YfWXGmKDxH4mPnZ5sQ7vB5URj2pabCFARZFEkNcoANH"
        ),
        text("I'll check the weather in Paris — 巴黎."),
        {
            "type": "tool_call",
            "id": "toolu_01A09q90qw90lq917835lq9",
            "name": "get_weather",
            "arguments": '{"city": "Paris", "unit": "c"}',
        },
    ]
    assert result["stop_reason"] == "tool_use"
    assert result["usage"] == ir.usage(
        input_tokens=10712, output_tokens=219, cache_read_tokens=8192, cache_write_tokens=2048
    )
    assert events[-1] == {"type": "stop"}


def test_input_tokens_told_only_on_message_delta():
    events = parse_stream("anthropic", stream_bytes("anthropic_late_input.sse"))
    finish = next(e for e in events if e["type"] == "finish")
    assert (finish["stop_reason"], finish["stop_sequence"]) == ("stop_sequence", "4")
    assert accumulate(events).result()["usage"] == ir.usage(input_tokens=12, output_tokens=9)


def test_unknown_blocks_ping_noise_and_errors():
    stream = b"".join(
        [
            b'event: ping\ndata: {"type":"ping"}\n\n',
            b"data: not json\n\n",
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"server_tool_use","id":"s","name":"web_search","input":{}}}\n\n',
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{}"}}\n\n',
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
            b'event: content_block_start\ndata: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":"Hi"}}\n\n',
            b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n',
        ]
    )
    parser = anthropic.StreamParser()
    events = [e for ev in frames(stream) for e in parser.feed(ev)]
    assert events == [
        {"type": "block_start", "index": 0, "block": text("")},
        {"type": "block_delta", "index": 0, "delta": {"text": "Hi"}},
        {"type": "error", "message": "Overloaded", "error_type": "overloaded_error"},
    ]
    assert parser.skipped == 1


# --- StreamRenderer ------------------------------------------------------------------


def render(events, **request):
    renderer = anthropic.StreamRenderer({"model": "alias", **request})
    return b"".join([f for e in events for f in renderer.feed(e)] + renderer.finish())


def test_render_a_stream_whose_usage_comes_late():
    # An OpenAI upstream: no usage at start, usage after the finish reason.
    events = [
        {"type": "start", "id": "chatcmpl-1", "model": "gpt-4o", "usage": None},
        {"type": "block_start", "index": 0, "block": text("")},
        {"type": "block_delta", "index": 0, "delta": {"text": "Hi"}},
        {"type": "block_stop", "index": 0},
        {
            "type": "block_start",
            "index": 1,
            "block": {"type": "tool_call", "id": "c1", "name": "f", "arguments": ""},
        },
        {"type": "block_delta", "index": 1, "delta": {"arguments": '{"a":1}'}},
        {"type": "finish", "stop_reason": "tool_use", "stop_sequence": None, "usage": None},
        {
            "type": "usage",
            "usage": ir.usage(input_tokens=100, output_tokens=7, cache_read_tokens=60),
        },
        {"type": "stop"},
    ]
    data = render(events)
    names = [e.event for e in frames(data)]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",  # closed for the upstream that did not
        "message_delta",
        "message_stop",
    ]
    bodies = json_frames(data)
    assert bodies[0]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert bodies[4]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f", "input": {}}
    assert bodies[5]["delta"] == {"type": "input_json_delta", "partial_json": '{"a":1}'}
    assert bodies[7] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 40, "cache_read_input_tokens": 60, "output_tokens": 7},
    }


def test_render_thinking_with_signature_and_redacted():
    events = parse_stream("anthropic", stream_bytes("anthropic_thinking.sse"))
    bodies = json_frames(render(events))
    assert bodies[0]["message"]["usage"] == {
        "input_tokens": 472,
        "cache_creation_input_tokens": 2048,
        "cache_read_input_tokens": 8192,
        "output_tokens": 0,
    }
    assert bodies[1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert {
        "type": "signature_delta",
        "signature": stream_bytes("anthropic_thinking.sse")
        .split(b'"signature":"')[2]
        .split(b'"')[0]
        .decode(),
    } in [b.get("delta") for b in bodies]
    assert any(b.get("content_block", {}).get("type") == "redacted_thinking" for b in bodies)


def test_error_missing_start_and_unfinished_streams():
    error = render([{"type": "error", "message": "boom", "error_type": "overloaded_error"}])
    assert (
        error
        == b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"boom"}}\n\n'
    )
    cut = frames(render([{"type": "block_delta", "index": 3, "delta": {"text": "partial"}}]))
    assert [e.event for e in cut] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert "ended before" in json.loads(cut[-1].data)["error"]["message"]


def test_stream_error_frame():
    assert anthropic.stream_error("slow down", "rate_limit_error") == (
        b'event: error\ndata: {"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}\n\n'
    )


def test_message_delta_leaves_out_an_input_count_nobody_knows():
    events = [
        {"type": "start", "id": "x", "model": "m", "usage": None},
        {
            "type": "finish",
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": ir.usage(output_tokens=3),
        },
        {"type": "stop"},
    ]
    delta = json_frames(render(events))[-2]
    assert delta["usage"] == {"output_tokens": 3}  # the SDK then keeps message_start's 0


# -- what a hostile upstream sent (a probe, 2026-12-07), each red before its fix ---------


@pytest.mark.parametrize(
    "block",
    [
        {"type": "text", "text": 5},
        {"type": "thinking", "thinking": ["a"], "signature": "s"},
        {"type": "thinking", "thinking": "a", "signature": 7},
        {"type": "redacted_thinking", "data": {"x": 1}},
        {"type": "tool_use", "id": 12, "name": "f", "input": {}},
        {"type": "tool_use", "id": "toolu_1", "name": False, "input": {}},
    ],
)
def test_an_answer_block_whose_text_is_not_a_string_is_an_unusable_answer(block):
    # A text of 5 went into the IR as is: rendering the answer for a client of another
    # format raised (a 500), and so did recording it (the record stayed pending).
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
              "content": [block], "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}}  # fmt: skip
    with pytest.raises(ValueError, match="not a string"):
        anthropic.parse_response(answer)


def test_an_answer_block_whose_text_is_null_is_empty():
    answer = {"content": [{"type": "text", "text": None}, {"type": "thinking", "thinking": None}]}
    content = anthropic.parse_response(answer)["content"]
    assert content == [text(""), reasoning("")]


@pytest.mark.parametrize(
    ("start", "delta"),
    [
        ({"type": "text", "text": ""}, {"type": "text_delta", "text": 5}),
        ({"type": "thinking", "thinking": ""}, {"type": "thinking_delta", "thinking": True}),
        ({"type": "thinking", "thinking": ""}, {"type": "signature_delta", "signature": 1.5}),
        ({"type": "tool_use", "id": "t", "name": "f", "input": {}}, {"type": "input_json_delta", "partial_json": {"a": 1}}),
        ({"type": "text", "text": 5}, {"type": "text_delta", "text": "ok"}),
    ],
)  # fmt: skip
def test_a_stream_event_whose_text_is_not_a_string_cannot_be_read(start, delta):
    # The parser handed a delta text of 5 on: the translator raised on it with part of
    # the client's stream sent, so the client's stream never ended and the record stayed
    # pending (the Accumulator raised too, when the call was being finished).
    parser = anthropic.StreamParser()
    events = [
        ("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 3}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": start}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
    ]  # fmt: skip
    raw = b"".join(sse_frame(name, data) for name, data in events)
    with pytest.raises(ValueError, match="not a string"):
        for event in frames(raw):
            parser.feed(event)


def test_a_stream_delta_whose_text_is_null_is_nothing():
    parser = anthropic.StreamParser()
    parser.feed(frames(sse_frame("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}))[0])  # fmt: skip
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": None},
    }
    assert parser.feed(frames(sse_frame("content_block_delta", delta))[0]) == []


def sse_frame(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def test_a_delta_for_a_block_that_never_started_starts_one():
    # A probe (2026-12-07): an upstream that sent text deltas without their
    # content_block_start had them relayed to an Anthropic client, but the record kept
    # none of the text (completed, empty) and a client of another format got none.
    parser = anthropic.StreamParser()
    raw = b"".join(
        [
            sse_frame("message_start", {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 3}}}),
            sse_frame("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
            sse_frame("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
            sse_frame("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
            sse_frame("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse_frame("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ]
    )  # fmt: skip
    events = [e for event in frames(raw) for e in parser.feed(event)]
    assert [e["type"] for e in events if e["type"].startswith("block")] == [
        "block_start", "block_delta", "block_delta", "block_start", "block_delta", "block_stop", "block_stop",
    ]  # fmt: skip
    content = accumulate(events).result()["content"]
    assert [b["type"] for b in content] == ["text", "tool_call"]
    assert content[0]["text"] == "Hello" and content[1]["arguments"] == "{}"
    assert content[1]["id"]  # a tool call needs an id to be answered
