"""Helpers for the adapter tests: one conversation in three formats, stream replay, fake SDK servers.

The SDK helpers hand an ``openai`` or ``anthropic`` client an ``httpx2`` mock transport
that answers every request with the given bytes, so the real SDK parses what our
renderers wrote, offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx2
import openai

from gateway import sse
from gateway.adapters import PROTOCOLS, ir

STREAMS = Path(__file__).parent / "streams"


def stream_bytes(name: str) -> bytes:
    """A recorded upstream stream from ``tests/streams``."""
    return (STREAMS / name).read_bytes()


def parse_stream(protocol: str, data: bytes, chunk: int | None = None) -> list[dict]:
    """Decode SSE bytes (in ``chunk``-byte pieces) and parse them with a protocol's parser."""
    decoder, parser = sse.Decoder(), PROTOCOLS[protocol].StreamParser()
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    events = []
    for piece in pieces:
        for event in decoder.feed(piece):
            events.extend(parser.feed(event))
    for event in decoder.flush():
        events.extend(parser.feed(event))
    return events + parser.finish()


def render_stream(protocol: str, events: list[dict], request: dict) -> bytes:
    """Render IR events with a protocol's renderer, ``finish()`` included."""
    renderer = PROTOCOLS[protocol].StreamRenderer(request)
    frames = [frame for event in events for frame in renderer.feed(event)]
    return b"".join(frames + renderer.finish())


def accumulate(events: list[dict]) -> ir.Accumulator:
    """An Accumulator fed with every event."""
    acc = ir.Accumulator()
    for event in events:
        acc.feed(event)
    return acc


def summary(resp: dict) -> dict:
    """What must survive a conversion: text, reasoning, tool calls, stop reason, usage."""
    blocks = resp["content"]
    return {
        "text": ir.text_of(blocks),
        "reasoning": "".join(b.get("text") or "" for b in blocks if b["type"] == "reasoning"),
        "calls": [
            (b["id"], b["name"], json.loads(b["arguments"]))
            for b in blocks
            if b["type"] == "tool_call"
        ],
        "stop_reason": resp["stop_reason"],
        "usage": resp["usage"],
    }


def frames(data: bytes) -> list[sse.Event]:
    """The SSE events in a byte string."""
    decoder = sse.Decoder()
    return decoder.feed(data) + decoder.flush()


def json_frames(data: bytes) -> list[dict]:
    """The JSON data of every event in a byte string (``[DONE]`` left out)."""
    return [json.loads(e.data) for e in frames(data) if e.data and e.data != "[DONE]"]


def _transport(body: bytes, content_type: str, seen: list[dict]) -> httpx2.MockTransport:
    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        return httpx2.Response(200, content=body, headers={"content-type": content_type})

    return httpx2.MockTransport(handler)


def openai_client(body: bytes, stream: bool = True, seen: list | None = None) -> openai.OpenAI:
    """An openai client whose server answers every request with ``body``."""
    content_type = "text/event-stream" if stream else "application/json"
    http = httpx2.Client(transport=_transport(body, content_type, [] if seen is None else seen))
    return openai.OpenAI(
        api_key="sk-test", base_url="http://gateway.test/v1", http_client=http, max_retries=0
    )


def anthropic_client(
    body: bytes, stream: bool = True, seen: list | None = None
) -> anthropic.Anthropic:
    """An anthropic client whose server answers every request with ``body``."""
    content_type = "text/event-stream" if stream else "application/json"
    http = httpx2.Client(transport=_transport(body, content_type, [] if seen is None else seen))
    return anthropic.Anthropic(
        api_key="sk-test", base_url="http://gateway.test", http_client=http, max_retries=0
    )


# A typical IR stream as a parser hands it on: signed reasoning, text, and a tool call
# whose block the upstream never stopped; usage told at start and at the finish.
IR_EVENTS = [
    {"type": "start", "id": "msg_up", "model": "claude", "usage": ir.usage(input_tokens=10, cache_read_tokens=4)},
    {"type": "block_start", "index": 0, "block": {"type": "reasoning", "text": "", "signature": None, "redacted": None}},
    {"type": "block_delta", "index": 0, "delta": {"reasoning": "Hm"}},
    {"type": "block_delta", "index": 0, "delta": {"signature": "sig"}},
    {"type": "block_stop", "index": 0},
    {"type": "block_start", "index": 1, "block": {"type": "text", "text": ""}},
    {"type": "block_delta", "index": 1, "delta": {"text": "Hi"}},
    {"type": "block_stop", "index": 1},
    {"type": "block_start", "index": 2, "block": {"type": "tool_call", "id": "toolu_1", "name": "f", "arguments": ""}},
    {"type": "block_delta", "index": 2, "delta": {"arguments": '{"a":'}},
    {"type": "block_delta", "index": 2, "delta": {"arguments": "1}"}},
    {"type": "finish", "stop_reason": "tool_use", "stop_sequence": None, "usage": ir.usage(output_tokens=6)},
    {"type": "stop"},
]  # fmt: skip

# One conversation (system, image, reasoning, a tool cycle, a follow-up) in each client
# format. Reasoning carries each protocol's own replay token.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
ASK = "What's the weather in Paris? Here is a photo."
ARGS = '{"city":"Paris"}'

CONVERSATIONS = {
    "openai-chat": {
        "model": "weather",
        "stream": True,
        "max_tokens": 512,
        "temperature": 0.5,
        "messages": [
            {"role": "system", "content": "You are a weather bot."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": ASK},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            },
            {
                "role": "assistant",
                "reasoning_content": "Need the tool.",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ARGS},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18°C, sunny"},
            {"role": "user", "content": "Thanks! And Tokyo?"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": WEATHER_PARAMETERS,
                },
            }
        ],
        "tool_choice": "auto",
    },
    "anthropic": {
        "model": "weather",
        "stream": True,
        "max_tokens": 512,
        "temperature": 0.5,
        "system": "You are a weather bot.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": ASK},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Need the tool.", "signature": "sig-1"},
                    {"type": "text", "text": "Let me check."},
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18°C, sunny"},
                    {"type": "text", "text": "Thanks! And Tokyo?"},
                ],
            },
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "Weather for a city",
                "input_schema": WEATHER_PARAMETERS,
            }
        ],
        "tool_choice": {"type": "auto"},
    },
    "openai-responses": {
        "model": "weather",
        "stream": True,
        "max_output_tokens": 512,
        "temperature": 0.5,
        "instructions": "You are a weather bot.",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": ASK},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"},
                ],
            },
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "Need the tool."}],
                "encrypted_content": "enc-1",
            },
            {"role": "assistant", "content": "Let me check."},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": ARGS,
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "18°C, sunny"},
            {"role": "user", "content": "Thanks! And Tokyo?"},
        ],
        "tools": [
            {
                "type": "function",
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER_PARAMETERS,
            }
        ],
        "tool_choice": "auto",
    },
}
