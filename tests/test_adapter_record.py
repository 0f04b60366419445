"""The stored record: one chat-shaped prompt and completion whatever the protocols."""

from __future__ import annotations

import pytest

from gateway.adapters import PROTOCOLS, ir, record
from gateway.errors import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from tests.adapter_support import (
    CONVERSATIONS,
    accumulate,
    parse_stream,
    stream_bytes,
)

FORMATS = [OPENAI_CHAT, ANTHROPIC, OPENAI_RESPONSES]

CHAT = CONVERSATIONS[OPENAI_CHAT]
# The record of the conversation is what a chat client sends for it, whatever was spoken.
PROMPT = {
    "messages": CHAT["messages"],
    "tools": CHAT["tools"],
    "tool_choice": "auto",
    "params": {"max_tokens": 512, "temperature": 0.5, "stream": True},
}


@pytest.mark.parametrize("client", FORMATS)
def test_the_same_conversation_makes_the_same_prompt_record(client):
    assert record.prompt(PROTOCOLS[client].parse_request(CONVERSATIONS[client])) == PROMPT


def test_extras_headers_and_params_are_kept_only_when_present():
    request = PROTOCOLS[OPENAI_CHAT].parse_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "top_p": 0.5,
            "stop": "END",
            "reasoning_effort": "low",
            "seed": 3,
        }
    )
    prompt = record.prompt(request, {"x-trace": "1"})
    assert prompt["params"] == {
        "top_p": 0.5,
        "stop": ["END"],
        "stream": False,
        "reasoning": {"effort": "low", "budget_tokens": None, "summary": None},
    }
    assert prompt["extraBody"] == {"seed": 3}
    assert prompt["extraHeaders"] == {"x-trace": "1"}
    bare = record.prompt(
        PROTOCOLS[OPENAI_CHAT].parse_request(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        ),
        {},
    )
    assert bare == {"messages": [{"role": "user", "content": "hi"}], "params": {"stream": False}}


SAME_ANSWER = {
    OPENAI_CHAT: {
        "choices": [
            {
                "message": {
                    "content": "Checking.",
                    "reasoning_content": "Use the tool.",
                    "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}}],
                },
                "finish_reason": "tool_calls",
            }
        ]
    },
    ANTHROPIC: {
        "content": [
            {"type": "thinking", "thinking": "Use the tool.", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {"city": "Tokyo"}},
        ],
        "stop_reason": "tool_use",
    },
    OPENAI_RESPONSES: {
        "status": "completed",
        "output": [
            {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "Use the tool."}]},
            {"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"id": "fc_1", "type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": '{"city":"Tokyo"}'},
        ],
    },
}  # fmt: skip


@pytest.mark.parametrize("upstream", FORMATS)
def test_the_same_answer_makes_the_same_completion_record(upstream):
    assert record.completion(PROTOCOLS[upstream].parse_response(SAME_ANSWER[upstream])) == [
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Use the tool.",
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'},
                }
            ],
        }
    ]


def test_completion_record_of_a_streamed_answer_and_of_nothing():
    answer = accumulate(
        parse_stream(OPENAI_CHAT, stream_bytes("openai_chat_vllm_length.sse"))
    ).result()
    assert record.completion(answer) == [
        {
            "role": "assistant",
            "content": "Bonjour le monde, this answer is cut",
            "reasoning_content": "Short question.",
        }
    ]
    assert record.completion(ir.empty_response()) == [{"role": "assistant", "content": None}]
