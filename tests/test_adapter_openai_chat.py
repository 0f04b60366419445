"""OpenAI Chat Completions adapter: requests, answers and streams, shape by shape."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import sse
from gateway.adapters import ir
from gateway.adapters import openai_chat as chat
from gateway.errors import InvalidRequest
from tests.adapter_support import (
    IR_EVENTS,
    accumulate,
    frames,
    json_frames,
    parse_stream,
    stream_bytes,
)
from tests.fuzz_support import FUZZ

USER = {"role": "user", "content": "hi"}
PNG = "data:image/png;base64,iVBORw0KGgo="
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def body(**fields):
    return {"model": "gpt-4o", "messages": [USER], **fields}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# --- parse_request -------------------------------------------------------------------


def test_system_and_developer_messages_become_the_ir_system():
    ir_req = chat.parse_request(
        body(
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
                USER,
            ]
        )
    )
    assert ir_req["system"] == [text("Be brief."), text("Use metric.")]
    assert ir_req["messages"] == [{"role": "user", "content": [text("hi")]}]


def test_multi_turn_with_images_in_every_source_form():
    ir_req = chat.parse_request(
        body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare"},
                        {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}},
                        {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
                    ],
                },
                {"role": "assistant", "content": "They differ."},
                {"role": "user", "content": "How?"},
            ]
        )
    )
    first, second, third = ir_req["messages"]
    assert first["content"] == [
        text("Compare"),
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
            "detail": "high",
        },
        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}, "detail": None},
    ]
    assert second == {"role": "assistant", "content": [text("They differ.")]}
    assert third == {"role": "user", "content": [text("How?")]}


def test_tool_cycle_with_parallel_calls_and_reasoning():
    ir_req = chat.parse_request(
        body(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "Two cities.",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a":1}'},
                        },
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {
                    "role": "tool",
                    "tool_call_id": "c2",
                    "content": [{"type": "text", "text": "rain"}],
                },
                {"role": "user", "content": "thanks"},
            ]
        )
    )
    assistant, results, follow_up = ir_req["messages"][1:]
    assert assistant["content"] == [
        {"type": "reasoning", "text": "Two cities.", "signature": None, "redacted": None},
        {"type": "tool_call", "id": "c1", "name": "f", "arguments": '{"a":1}'},
        {"type": "tool_call", "id": "c2", "name": "f", "arguments": "{}"},
    ]
    assert results == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_call_id": "c1",
                "content": [text("sunny")],
                "is_error": False,
            },
            {
                "type": "tool_result",
                "tool_call_id": "c2",
                "content": [text("rain")],
                "is_error": False,
            },
        ],
    }
    assert follow_up == {"role": "user", "content": [text("thanks")]}


def test_vllm_reasoning_field_on_assistant_messages():
    ir_req = chat.parse_request(
        body(messages=[USER, {"role": "assistant", "content": "ok", "reasoning": "hmm"}])
    )
    assert [b["type"] for b in ir_req["messages"][1]["content"]] == ["reasoning", "text"]
    assert ir_req["messages"][1]["content"][0]["text"] == "hmm"


def test_legacy_function_call_and_function_role():
    ir_req = chat.parse_request(
        body(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "f", "arguments": "{}"},
                },
                {"role": "function", "name": "f", "content": "42"},
            ],
            functions=[{"name": "f", "parameters": {"type": "object"}}],
            function_call={"name": "f"},
        )
    )
    call = ir_req["messages"][1]["content"][0]
    result = ir_req["messages"][2]["content"][0]
    assert call["type"] == "tool_call" and call["name"] == "f"
    assert result["tool_call_id"] == call["id"]
    assert ir_req["tools"] == [{"name": "f", "description": None, "parameters": {"type": "object"}}]
    assert ir_req["tool_choice"] == {"type": "tool", "name": "f"}


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "required"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
def test_every_tool_choice_form(wire, expected):
    ir_req = chat.parse_request(body(tools=[WEATHER], tool_choice=wire))
    assert ir_req["tool_choice"] == expected
    assert chat.build_request(ir_req, "up")["tool_choice"] == wire


def test_sampling_limits_reasoning_and_stream_fields():
    ir_req = chat.parse_request(
        body(
            stream=True,
            stream_options={"include_usage": True, "include_obfuscation": False},
            max_completion_tokens=300,
            max_tokens=100,
            temperature=0,
            top_p=0.9,
            top_k=20,
            stop="END",
            parallel_tool_calls=False,
            reasoning_effort="high",
        )
    )
    assert ir_req["stream"] is True and ir_req["stream_usage"] is True
    assert ir_req["max_tokens"] == 300  # max_completion_tokens wins
    assert (ir_req["temperature"], ir_req["top_p"], ir_req["top_k"]) == (0, 0.9, 20)
    assert ir_req["stop"] == ["END"]
    assert ir_req["parallel_tool_calls"] is False
    assert ir_req["reasoning"] == {"effort": "high", "budget_tokens": None, "summary": None}
    assert ir_req["extra"] == {"stream_options": {"include_obfuscation": False}}


def test_the_edges_of_every_range_are_accepted():
    passed_on = {
        "n": 128,
        "seed": -(2**63),
        "top_logprobs": 20,
        "presence_penalty": -2,
        "frequency_penalty": 2.0,
        "logit_bias": {"1": -100, "2": 100},
        "metadata": {"k": "v"},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
    }
    ir_req = chat.parse_request(
        body(max_tokens=2**31 - 1, temperature=2, top_p=0, top_k=-1, **passed_on)
    )
    assert (ir_req["max_tokens"], ir_req["temperature"], ir_req["top_p"]) == (2**31 - 1, 2, 0)
    assert ir_req["top_k"] == -1 and ir_req["extra"] == passed_on
    assert chat.parse_request(body(max_completion_tokens=0))["max_tokens"] == 0


def test_unmapped_fields_are_forwarded_unchanged():
    extra = {
        "n": 1,
        "seed": 7,
        "response_format": {"type": "json_object"},
        "user": "u1",
        "logprobs": True,
    }
    ir_req = chat.parse_request(body(**extra))
    assert ir_req["extra"] == extra
    assert ir_req["stream_usage"] is False


@pytest.mark.parametrize(
    ("request_body", "param", "message"),
    [
        ([], None, "request body must be a JSON object"),
        ({"messages": [USER]}, "model", "model is required"),
        (body(model=""), "model", "model must be a non-empty string"),
        (body(model=5), "model", "model must be a non-empty string"),
        ({"model": "m"}, "messages", "messages is required"),
        (body(messages=[]), "messages", "messages must not be empty"),
        (body(messages={"role": "user"}), "messages", "messages must be an array"),
        (body(stream="yes"), "stream", "stream must be a boolean"),
        (body(max_tokens="10"), "max_tokens", "max_tokens must be an integer"),
        (body(max_tokens=True), "max_tokens", "max_tokens must be an integer"),
        (body(max_completion_tokens=1.5), "max_completion_tokens", "must be an integer"),
        (body(temperature="hot"), "temperature", "temperature must be a number"),
        (body(top_p=False), "top_p", "top_p must be a number"),
        (body(stop=5), "stop", "stop must be a string or an array of strings"),
        (
            body(stream_options={"include_usage": "y"}),
            "stream_options.include_usage",
            "must be a boolean",
        ),
        (body(tools={}), "tools", "tools must be an array"),
        (body(tools=[{"type": "custom", "custom": {}}]), "tools[0].type", "must be 'function'"),
        (
            body(tools=[{"type": "function", "function": {}}]),
            "tools[0].function.name",
            "non-empty string",
        ),
        (body(tools=[WEATHER], tool_choice="sometimes"), "tool_choice", "must be one of"),
        (
            body(tools=[WEATHER], tool_choice={"type": "function"}),
            "tool_choice",
            "tool_choice must be",
        ),
        (body(reasoning_effort=3), "reasoning_effort", "must be a string"),
        (body(messages=["hi"]), "messages[0]", "messages[0] must be an object"),
        (body(messages=[{"content": "hi"}]), "messages[0].role", "must be one of"),
        (body(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role", "must be one of"),
        (
            body(messages=[{"role": "user", "content": 5}]),
            "messages[0].content",
            "string or an array",
        ),
        (
            body(messages=[{"role": "user"}]),
            "messages[0].content",
            "messages[0].content is required",
        ),
        (
            body(
                messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
            ),
            "messages[0].content[0].type",
            "'input_audio' is not supported",
        ),
        (
            body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content[0].image_url.url",
            "is required",
        ),
        (
            body(
                messages=[
                    {
                        "role": "system",
                        "content": [{"type": "image_url", "image_url": {"url": PNG}}],
                    }
                ]
            ),
            "messages[0].content[0].type",
            "not supported",
        ),
        (
            body(messages=[USER, {"role": "tool", "content": "x"}]),
            "messages[1].tool_call_id",
            "tool_call_id is required",
        ),
        (
            body(
                messages=[USER, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]
            ),
            "messages[1].tool_calls[0].id",
            "is required",
        ),
        (
            body(
                messages=[USER, {"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]
            ),
            "messages[1].tool_calls[0].function.name",
            "is required",
        ),
        # Counts a 32-bit column holds, the ranges OpenAI documents, and the types of the
        # fields sent on as they are.
        (body(max_tokens=-5), "max_tokens", "max_tokens must be an integer from 0 to 2147483647"),
        (body(max_tokens=10**30), "max_tokens", "from 0 to 2147483647"),
        (body(max_tokens=2**53 + 1), "max_tokens", "from 0 to 2147483647"),
        (body(max_completion_tokens=-1), "max_completion_tokens", "from 0"),
        (body(temperature=1e308), "temperature", "temperature must be a number from 0 to 2"),
        (body(temperature=-0.5), "temperature", "from 0 to 2"),
        (body(top_p=1.5), "top_p", "top_p must be a number from 0 to 1"),
        (body(top_k=-2), "top_k", "top_k must be an integer from -1"),
        (body(n="2"), "n", "n must be an integer"),
        (body(n=0), "n", "n must be an integer from 1 to 128"),
        (body(n=10**20), "n", "from 1 to 128"),
        (body(response_format=7), "response_format", "response_format must be an object"),
        (body(response_format={}), "response_format.type", "response_format.type is required"),
        (body(response_format={"type": 1}), "response_format.type", "must be a string"),
        (body(seed=2**63), "seed", "seed must be an integer from"),
        (body(seed="7"), "seed", "seed must be an integer"),
        (body(presence_penalty=3), "presence_penalty", "from -2 to 2"),
        (body(frequency_penalty="x"), "frequency_penalty", "must be a number"),
        (body(logit_bias=[1]), "logit_bias", "logit_bias must be an object"),
        (body(logit_bias={"50256": 101}), "logit_bias.50256", "from -100 to 100"),
        (body(logprobs="yes"), "logprobs", "must be a boolean"),
        (body(top_logprobs=21), "top_logprobs", "from 0 to 20"),
        (body(user=5), "user", "user must be a string"),
        (body(metadata="x"), "metadata", "metadata must be an object"),
        (body(metadata={"k": 1}), "metadata.k", "metadata.k must be a string"),
        (body(store=1), "store", "must be a boolean"),
        (body(modalities="text"), "modalities", "must be an array"),
        (body(service_tier=1), "service_tier", "must be a string"),
        (body(prompt_cache_key=[]), "prompt_cache_key", "must be a string"),
        (body(safety_identifier=2), "safety_identifier", "must be a string"),
        (body(verbosity={}), "verbosity", "must be a string"),
        # A falsy value of the wrong type is no absent one.
        (
            body(messages=[USER, {"role": "tool", "tool_call_id": "c", "content": 0}]),
            "messages[1].content",
            "string or an array",
        ),
        (
            body(tools=[WEATHER], tool_choice={"type": 0, "function": {"name": "get_weather"}}),
            "tool_choice.type",
            "tool_choice.type must be 'function'",
        ),
        (
            body(messages=[{"role": "user", "content": "hi", "name": 7}]),
            "messages[0].name",
            "messages[0].name must be a string",
        ),
        (
            body(messages=[USER, {"role": "assistant", "content": "x", "reasoning_content": 5}]),
            "messages[1].reasoning_content",
            "must be a string",
        ),
        (
            body(
                messages=[
                    USER,
                    {"role": "assistant", "tool_calls": [{"id": "c", "type": 1, "function": {}}]},
                ]
            ),
            "messages[1].tool_calls[0].type",
            "must be a string",
        ),
    ],
)
def test_validation_errors_name_the_field(request_body, param, message):
    with pytest.raises(InvalidRequest) as caught:
        chat.parse_request(request_body)
    error = caught.value
    assert (error.status, error.kind, error.param) == (400, "invalid_request_error", param)
    assert message in error.message


# --- build_request -------------------------------------------------------------------

CANONICAL = {
    "model": "up",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                text("Look"),
                {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Need the tool.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ],
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 64,
    "temperature": 0.2,
    "stop": ["END"],
    "parallel_tool_calls": True,
    "tools": [WEATHER],
    "tool_choice": "auto",
    "seed": 11,
}


def test_chat_to_chat_round_trip_is_faithful():
    rebuilt = chat.build_request(chat.parse_request(CANONICAL), "up")
    assert rebuilt == CANONICAL


def test_mapped_fields_win_over_extras():
    ir_req = chat.parse_request(body(stream=True))
    ir_req["extra"] = {"model": "evil", "messages": [], "stream": False, "logit_bias": {"1": 2}}
    built = chat.build_request(ir_req, "up")
    assert (
        built["model"] == "up"
        and built["messages"][0]["content"] == "hi"
        and built["stream"] is True
    )
    assert built["logit_bias"] == {"1": 2}


def test_stream_usage_is_asked_for_and_merged_with_client_options():
    ir_req = chat.parse_request(body(stream=True, stream_options={"include_obfuscation": False}))
    assert chat.build_request(ir_req, "up")["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }
    assert chat.build_request(ir_req, "up", stream_usage=False)["stream_options"] == {
        "include_obfuscation": False
    }
    assert "stream_options" not in chat.build_request(chat.parse_request(body()), "up")


@pytest.mark.parametrize(
    ("model", "reasoning", "field"),
    [
        ("gpt-4o", None, "max_tokens"),
        ("llama3.1:8b", None, "max_tokens"),
        ("o3-mini", None, "max_completion_tokens"),
        ("gpt-5-mini", None, "max_completion_tokens"),
        (
            "qwen3",
            {"effort": "low", "budget_tokens": None, "summary": None},
            "max_completion_tokens",
        ),
    ],
)
def test_max_tokens_spelling_follows_the_upstream_model(model, reasoning, field):
    ir_req = chat.parse_request(body(max_tokens=50))
    ir_req["reasoning"] = reasoning
    built = chat.build_request(ir_req, model)
    assert built[field] == 50
    assert {"max_tokens", "max_completion_tokens"} & set(built) == {field}


@pytest.mark.parametrize(
    ("budget", "effort"), [(1024, "low"), (4096, "medium"), (8192, "medium"), (32000, "high")]
)
def test_thinking_budget_becomes_an_effort(budget, effort):
    ir_req = chat.parse_request(body())
    ir_req["reasoning"] = {"effort": None, "budget_tokens": budget, "summary": None}
    assert chat.build_request(ir_req, "up")["reasoning_effort"] == effort


def test_anthropic_shaped_ir_becomes_chat_messages():
    ir_req = chat.parse_request(body())
    ir_req["system"] = [text("one"), text("two")]
    ir_req["messages"] = [
        {
            "role": "assistant",
            "content": [{"type": "reasoning", "text": "", "signature": None, "redacted": "x"}],
        },
        {
            "role": "user",
            "content": [
                text("before"),
                {
                    "type": "tool_result",
                    "tool_call_id": "t1",
                    "content": [
                        text("see image"),
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://x.test/i.png"},
                            "detail": None,
                        },
                    ],
                    "is_error": True,
                },
            ],
        },
    ]
    messages = chat.build_request(ir_req, "up")["messages"]
    assert messages == [
        {"role": "system", "content": "one\ntwo"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "tool_call_id": "t1", "content": "see image"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "before"},
                {"type": "image_url", "image_url": {"url": "https://x.test/i.png"}},
            ],
        },
    ]


def test_tool_choice_tool_and_strict_tools():
    ir_req = chat.parse_request(body())
    ir_req["tools"] = [{"name": "f", "description": None, "parameters": None, "strict": True}]
    ir_req["tool_choice"] = {"type": "tool", "name": "f"}
    built = chat.build_request(ir_req, "up")
    assert built["tools"] == [{"type": "function", "function": {"name": "f", "strict": True}}]
    assert built["tool_choice"] == {"type": "function", "function": {"name": "f"}}


# --- parse_response / render_response -----------------------------------------------

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-2024",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Calling.",
                "reasoning_content": "Think.",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a":1}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "prompt_tokens_details": {"cached_tokens": 64},
        "completion_tokens_details": {"reasoning_tokens": 8},
    },
}


def test_parse_response_reads_reasoning_text_calls_and_usage():
    resp = chat.parse_response(COMPLETION)
    assert resp["id"] == "chatcmpl-1" and resp["model"] == "gpt-4o-2024"
    assert resp["content"] == [
        {"type": "reasoning", "text": "Think.", "signature": None, "redacted": None},
        text("Calling."),
        {"type": "tool_call", "id": "c1", "name": "f", "arguments": '{"a":1}'},
    ]
    assert resp["stop_reason"] == "tool_use"
    assert resp["usage"] == ir.usage(
        input_tokens=100, output_tokens=20, cache_read_tokens=64, reasoning_tokens=8
    )


@pytest.mark.parametrize(
    ("finish", "extra", "stop"),
    [
        ("stop", {}, ("end_turn", None)),
        ("length", {}, ("max_tokens", None)),
        ("tool_calls", {}, ("tool_use", None)),
        ("function_call", {}, ("tool_use", None)),
        ("content_filter", {}, ("content_filter", None)),
        (None, {}, (None, None)),
        ("stop", {"stop_reason": "###"}, ("stop_sequence", "###")),  # vLLM names the stop string
    ],
)
def test_finish_reasons(finish, extra, stop):
    resp = chat.parse_response(
        {"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": finish, **extra}]}
    )
    assert (resp["stop_reason"], resp["stop_sequence"]) == stop


def test_unknown_usage_stays_unknown_and_vendor_fields_are_read():
    resp = chat.parse_response(
        {"choices": [{"message": {"content": None, "reasoning": "r"}, "finish_reason": "stop"}]}
    )
    assert resp["usage"] == ir.usage()
    assert resp["content"][0]["text"] == "r"
    deepseek = {"prompt_tokens": 10, "completion_tokens": 2, "prompt_cache_hit_tokens": 6}
    assert (
        chat.parse_response({"choices": [], "usage": deepseek})["usage"]["cache_read_tokens"] == 6
    )


def test_render_response_for_the_sdk():
    resp = chat.parse_response(COMPLETION)
    resp["usage"]["cache_write_tokens"] = 4
    rendered = chat.render_response(resp, {"model": "alias"})
    assert rendered["object"] == "chat.completion" and rendered["id"] == "chatcmpl-1"
    assert rendered["choices"][0]["message"] == COMPLETION["choices"][0]["message"]
    assert rendered["choices"][0]["finish_reason"] == "tool_calls"
    assert rendered["usage"] == {
        **COMPLETION["usage"],
        "prompt_tokens_details": {"cached_tokens": 64, "cache_write_tokens": 4},
    }


def test_render_response_leaves_out_unknown_usage_and_zero_fills_half_known():
    resp = ir.empty_response()
    resp["content"] = [text("hi")]
    assert "usage" not in chat.render_response(resp, {"model": "m"})
    resp["usage"] = ir.usage(input_tokens=5)
    assert chat.render_response(resp, {"model": "m"})["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 0,
        "total_tokens": 5,
    }


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("content_filter", "content_filter"), ("refusal", "content_filter"), ("pause_turn", "stop"), (None, "stop")],
)  # fmt: skip
def test_render_finish_reasons(stop, finish):
    resp = ir.empty_response()
    resp["stop_reason"] = stop
    assert chat.render_response(resp, {"model": "m"})["choices"][0]["finish_reason"] == finish


# --- StreamParser --------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 7, 100])
def test_parser_on_a_recorded_tool_stream(chunk):
    events = parse_stream("openai-chat", stream_bytes("openai_chat_tools.sse"), chunk)
    kinds = [(e["type"], e.get("index")) for e in events if e["type"] != "block_delta"]
    assert kinds == [
        ("start", None),
        ("block_start", 0),  # reasoning
        ("block_stop", 0),
        ("block_start", 1),  # text
        ("block_stop", 1),
        ("block_start", 2),  # first call
        ("block_stop", 2),
        ("block_start", 3),  # second call
        ("block_stop", 3),
        ("finish", None),
        ("usage", None),
        ("stop", None),
    ]
    result = accumulate(events).result()
    assert [b["type"] for b in result["content"]] == ["reasoning", "text", "tool_call", "tool_call"]
    assert result["content"][2] == {
        "type": "tool_call",
        "id": "call_paris01",
        "name": "get_weather",
        "arguments": '{"city":"Paris","unit":"c"}',
    }
    assert result["stop_reason"] == "tool_use"
    assert result["usage"] == ir.usage(
        input_tokens=1200, output_tokens=180, cache_read_tokens=1024, reasoning_tokens=64
    )


# Values near the shortcut's edges: each field present or not, of the right type or not.
_odd = st.sampled_from([None, "", 0, 0.0, False, 1, [], {}, "x"])
_deltas = st.dictionaries(
    st.sampled_from(["content", "role", "reasoning_content", "reasoning", "tool_calls"]),
    st.one_of(
        _odd,
        st.text(max_size=3),
        st.just([{"index": 0, "id": "call_1", "function": {"name": "f"}}]),
    ),
    max_size=3,
)
_choices = st.fixed_dictionaries(
    {},
    optional={
        "index": st.sampled_from([0, 0.0, False, 1]),
        "delta": st.one_of(_deltas, _odd),
        "finish_reason": st.sampled_from([None, "", "stop", "length"]),
    },
)
_chunks = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.one_of(st.lists(st.one_of(_choices, _odd), max_size=2), _odd),
        "usage": st.one_of(_odd, st.just({"prompt_tokens": 3, "completion_tokens": 2})),
        "error": st.sampled_from([None, "", "boom"]),
        "object": st.sampled_from(["chat.completion.chunk", "error"]),
    },
)


@st.composite
def _near_common(draw: st.DrawFn) -> dict:
    """The common text chunk, or one thing away from it (each a reason not to shortcut)."""
    choice: dict = {"index": 0, "delta": {"content": draw(st.sampled_from(["go", "", 1, None]))}}
    if draw(st.booleans()):
        choice[draw(st.sampled_from(["index", "finish_reason"]))] = draw(
            st.sampled_from([1, 0.0, False, None, "", "stop"])
        )
    if draw(st.booleans()):
        choice["delta"][draw(st.sampled_from(["role", "reasoning_content", "tool_calls"]))] = "x"
    chunk = {"choices": [choice, dict(choice)] if draw(st.booleans()) else [choice]}
    if draw(st.booleans()):
        chunk["usage"] = draw(st.sampled_from([None, {}, {"prompt_tokens": 3}]))
    return chunk


@settings(FUZZ, max_examples=600)
@given(chunks=st.lists(st.one_of(_chunks, _near_common()), max_size=8))
@example(chunks=[{"choices": [{"index": 0, "delta": {"content": "go"}, "finish_reason": "stop"}]}])
@example(chunks=[{"choices": [{"delta": {"content": "go"}}, {"delta": {"content": "no"}}]}])
@example(chunks=[{"choices": [{"index": 1, "delta": {"content": "go"}}]}])
@example(chunks=[{"choices": [{"delta": {"content": "go", "reasoning_content": "x"}}]}])
@example(chunks=[{"choices": [{"delta": {"content": "go"}}], "usage": {"prompt_tokens": 3}}])
def test_the_parser_s_shortcut_for_text_chunks_makes_what_its_full_path_makes(chunks):
    # Every stream opens a text block first, so that the shortcut is taken where it can be.
    opening = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]}
    events = [sse.Event(data=json.dumps(c)) for c in [opening, *chunks]]

    def parsed() -> list:
        parser = chat.StreamParser()
        outcomes: list = []
        for event in events:
            try:
                outcomes.append(parser.feed(event))
            except (TypeError, AttributeError) as exc:  # a shape no server sends (the
                outcomes.append(type(exc))  # translator's BrokenStream): the same error
        return [*outcomes, parser.finish()]

    shortcut = parsed()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chat.stream, "_more_text", lambda chunk: None)  # the full path only
        assert shortcut == parsed()


def test_the_common_text_chunk_takes_the_shortcut():
    # Else the test above would compare the full path with itself.
    text = {"choices": [{"index": 0, "delta": {"content": "go"}}]}
    parser = chat.StreamParser()
    parser.feed(sse.Event(data=json.dumps(text)))  # opens the block: the full path
    assert chat.stream._more_text(text) == "go"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chat.stream, "first_choice", None)  # the full path would fail
        assert parser.feed(sse.Event(data=json.dumps(text))) == [
            {"type": "block_delta", "index": 0, "delta": {"text": "go"}}
        ]


def test_a_usage_only_chunk_yields_only_a_usage_event():
    # The relay drops such a chunk for clients that did not ask for usage.
    parser = chat.StreamParser()
    outputs = [
        (event.data, parser.feed(event)) for event in frames(stream_bytes("openai_chat_tools.sse"))
    ]
    usage_only = [out for data, out in outputs if '"choices":[]' in data]
    assert len(usage_only) == 1
    assert [e["type"] for e in usage_only[0]] == ["usage"]
    assert usage_only[0][0]["usage"]["input_tokens"] == 1200


def test_vllm_stream_with_usage_on_the_finish_chunk():
    events = parse_stream("openai-chat", stream_bytes("openai_chat_vllm_length.sse"))
    finish = next(e for e in events if e["type"] == "finish")
    assert finish["stop_reason"] == "max_tokens"
    assert finish["usage"] == ir.usage(input_tokens=31, output_tokens=16)
    assert "usage" not in [e["type"] for e in events]  # told once, on the finish
    result = accumulate(events).result()
    assert ir.text_of(result["content"]) == "Bonjour le monde, this answer is cut"
    assert result["content"][0] == {
        "type": "reasoning",
        "text": "Short question.",
        "signature": None,
        "redacted": None,
    }


@pytest.mark.parametrize(
    "data",
    [
        '{"error":{"message":"overloaded","type":"server_error","code":null}}',
        '{"object":"error","message":"overloaded","type":"server_error","code":503}',
    ],
)
def test_error_chunks_become_error_events(data):
    assert chat.StreamParser().feed(frames(f"data: {data}\n\n".encode())[0]) == [
        {"type": "error", "message": "overloaded", "error_type": "server_error"}
    ]


def test_noise_is_skipped_not_fatal():
    parser = chat.StreamParser()
    noise = b": keep-alive\n\ndata: \n\ndata: {not json\n\ndata: [1,2]\n\nevent: ping\n\n"
    assert [e for ev in frames(noise) for e in parser.feed(ev)] == []
    assert parser.skipped == 2


def test_finish_without_done_still_stops_but_a_cut_stream_does_not():
    whole = b"".join(stream_bytes("openai_chat_tools.sse").split(b"data: [DONE]\n\n"))
    assert parse_stream("openai-chat", whole)[-1] == {"type": "stop"}
    cut = (
        stream_bytes("openai_chat_tools.sse")
        .split(b'"finish_reason":"tool_calls"')[0]
        .rsplit(b"\n\n", 1)[0]
    )
    events = parse_stream("openai-chat", cut + b"\n\n")
    assert {"type": "stop"} not in events and not any(e["type"] == "finish" for e in events)


def test_tool_calls_without_an_index():
    stream = b"".join(
        b"data: " + json.dumps({"choices": [{"index": 0, "delta": d}]}).encode() + b"\n\n"
        for d in [
            {"tool_calls": [{"id": "a", "function": {"name": "f", "arguments": '{"x"'}}]},
            {"tool_calls": [{"function": {"arguments": ":1}"}}]},
            {"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": "{}"}}]},
        ]
    )
    result = accumulate(parse_stream("openai-chat", stream)).result()
    assert [(b["id"], b["arguments"]) for b in result["content"]] == [("a", '{"x":1}'), ("b", "{}")]


# --- StreamRenderer ------------------------------------------------------------------


def render(events, **request):
    renderer = chat.StreamRenderer({"model": "alias", **request})
    out = [frame for event in events for frame in renderer.feed(event)]
    return b"".join(out + renderer.finish())


def test_rendered_stream_is_what_the_sdk_expects():
    data = render(IR_EVENTS, stream_usage=True)
    events = frames(data)
    assert all(e.event is None for e in events) and events[-1].data == "[DONE]"
    chunks = json_frames(data)
    assert {c["id"] for c in chunks} == {"msg_up"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert {"reasoning_content": "Hm"} in deltas and {"content": "Hi"} in deltas
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {
        "index": 0,
        "id": "toolu_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    assert [c["index"] for c in calls] == [0, 0, 0]  # zero-based among tool calls, not block 2
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1] == {
        **chunks[-1],
        "choices": [],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 6,
            "total_tokens": 16,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }


def test_usage_chunk_only_when_the_client_asked():
    assert all("usage" not in c for c in json_frames(render(IR_EVENTS, stream_usage=False)))


def test_usage_after_finish_reaches_the_usage_chunk():
    events = [
        *IR_EVENTS[:-2],
        {**IR_EVENTS[-2], "usage": None},
        {"type": "usage", "usage": ir.usage(input_tokens=7, output_tokens=3)},
        {"type": "stop"},
    ]
    assert json_frames(render(events, stream_usage=True))[-1]["usage"]["prompt_tokens"] == 7


def test_missing_start_and_second_tool_call_numbering():
    events = [
        {
            "type": "block_start",
            "index": 4,
            "block": {"type": "tool_call", "id": "a", "name": "f", "arguments": ""},
        },
        {
            "type": "block_start",
            "index": 5,
            "block": {"type": "tool_call", "id": "b", "name": "g", "arguments": ""},
        },
        {"type": "block_delta", "index": 7, "delta": {"arguments": "{}"}},  # never started
        {"type": "finish", "stop_reason": "tool_use", "stop_sequence": None, "usage": None},
        {"type": "stop"},
    ]
    chunks = json_frames(render(events))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[0]["id"].startswith(
        "chatcmpl-"
    )
    indexes = [
        c["choices"][0]["delta"]["tool_calls"][0]["index"]
        for c in chunks
        if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert indexes == [0, 1, 2, 2]


def test_error_ends_the_stream_and_nothing_follows():
    renderer = chat.StreamRenderer({"model": "m"})
    out = renderer.feed(IR_EVENTS[0]) + renderer.feed(
        {"type": "error", "message": "boom", "error_type": "overloaded_error"}
    )
    assert renderer.feed(IR_EVENTS[5]) == [] and renderer.finish() == []
    error, done = frames(out[-1])
    assert json.loads(error.data) == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
    }
    assert done.data == "[DONE]"


def test_finish_without_an_answer_tells_the_client():
    renderer = chat.StreamRenderer({"model": "m"})
    renderer.feed(IR_EVENTS[0])
    error = json.loads(frames(b"".join(renderer.finish()))[0].data)
    assert "ended before" in error["error"]["message"]


def test_stream_error_frames():
    assert chat.stream_error("bad", "rate_limit_error") == (
        b'data: {"error":{"message":"bad","type":"rate_limit_error","param":null,"code":null}}\n\n'
        b"data: [DONE]\n\n"
    )


def test_tool_settings_go_upstream_only_with_tools():
    # OpenAI rejects parallel_tool_calls (and tool_choice) when no tools are given.
    built = chat.build_request(
        chat.parse_request(body(tool_choice="none", parallel_tool_calls=False)), "up"
    )
    assert "tool_choice" not in built and "parallel_tool_calls" not in built
    built = chat.build_request(
        chat.parse_request(body(tools=[WEATHER], parallel_tool_calls=False)), "up"
    )
    assert built["parallel_tool_calls"] is False


def test_an_empty_user_message_survives():
    built = chat.build_request(
        chat.parse_request(body(messages=[{"role": "user", "content": ""}])), "up"
    )
    assert built["messages"] == [{"role": "user", "content": ""}]


@pytest.mark.parametrize("details", ["x", [], [1], 5, True])
def test_usage_details_of_another_type_leave_their_counts_unknown(details):
    # A probe (2026-12-07): prompt_tokens_details "x" raised AttributeError, so a whole
    # answer was refused (502) and a whole stream failed at its usage chunk, its record
    # "failed" though the client had every word.
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "prompt_tokens_details": details,
             "completion_tokens_details": details}  # fmt: skip
    answer = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": usage}
    assert chat.parse_response(answer)["usage"] == ir.usage(input_tokens=9, output_tokens=4)
    parser = chat.StreamParser()
    chunk = {"id": "c", "choices": [], "usage": usage}
    events = parser.feed(sse.Event(data=json.dumps(chunk)))
    assert events == [{"type": "usage", "usage": ir.usage(input_tokens=9, output_tokens=4)}]


def test_streamed_content_given_as_parts_is_the_answers_text():
    # Some servers (Mistral's reasoning models) stream content as a list of parts, as
    # a JSON answer's may be. A probe (2026-12-07): relayed to a Chat client, but lost
    # for the record (completed without it) and for clients of another format.
    parser = chat.StreamParser()
    events = []
    for delta in ({"role": "assistant", "content": [{"type": "text", "text": "A"}]},
                  {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hm"}]}, {"type": "text", "text": "B"}, "x"]},
                  {"content": "C"}):  # fmt: skip
        chunk = {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        events += parser.feed(sse.Event(data=json.dumps(chunk)))
    assert ir.text_of(accumulate(events).result()["content"]) == "ABC"
