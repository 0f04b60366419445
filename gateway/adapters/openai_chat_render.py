"""The IR rendered for OpenAI Chat Completions clients: ``chat.completion`` bodies and chunks.

Follows what the ``openai`` SDK parses (``_streaming.py``, ``lib/streaming/chat``): every
chunk of one stream has the same ``id``; the first carries ``delta.role``; tool calls are
numbered from 0 among tool calls (the SDK inserts them into a list by ``index``); usage
is sent once, in a last chunk with ``choices: []``, only when the client asked for it
(``stream_options.include_usage``); ``data: [DONE]`` ends the stream; the SDK raises
``APIError`` on a chunk that has an ``error`` key.
"""

from __future__ import annotations

import time
from typing import Any

from gateway import sse
from gateway.errors import OPENAI_CHAT, error_body

from . import ir, wire
from .rendering import StreamRendererBase

IR_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "content_filter": "content_filter",
    "refusal": "content_filter",
}


def render_response(resp: dict, request: dict) -> dict:
    """Render an IR response as the ``chat.completion`` body the openai SDK parses."""
    message = assistant_message(resp.get("content") or [])
    body: dict[str, Any] = {
        "id": resp.get("id") or wire.new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": resp.get("model") or request.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": IR_TO_FINISH.get(resp.get("stop_reason"), "stop"),
            }
        ],
    }
    usage = usage_to_chat(resp.get("usage"))
    if usage:
        body["usage"] = usage
    return body


def assistant_message(blocks: list[dict]) -> dict:
    """IR assistant blocks as a chat message: text, ``reasoning_content``, ``tool_calls``."""
    message: dict[str, Any] = {"role": "assistant", "content": ir.text_of(blocks) or None}
    reasoning = "".join(b.get("text") or "" for b in blocks if b["type"] == "reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [
        {
            "id": b["id"],
            "type": "function",
            "function": {"name": b["name"], "arguments": b["arguments"]},
        }
        for b in blocks
        if b["type"] == "tool_call"
    ]
    if calls:
        message["tool_calls"] = calls
    return message


def usage_to_chat(usage: dict | None) -> dict | None:
    """IR usage as an OpenAI ``usage`` object; None when neither count is known."""
    if not usage or (usage.get("input_tokens") is None and usage.get("output_tokens") is None):
        return None
    prompt, completion = usage.get("input_tokens") or 0, usage.get("output_tokens") or 0
    body: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    details = {
        name: usage[field]
        for name, field in (
            ("cached_tokens", "cache_read_tokens"),
            ("cache_write_tokens", "cache_write_tokens"),
        )
        if usage.get(field) is not None
    }
    if details:
        body["prompt_tokens_details"] = details
    if usage.get("reasoning_tokens") is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": usage["reasoning_tokens"]}
    return body


def stream_error(message: str, kind: str = "api_error") -> bytes:
    """An error chunk (the openai SDK raises ``APIError`` on it), then ``[DONE]``."""
    body = error_body(OPENAI_CHAT, kind, message)
    return wire.frame(body) + sse.encode("[DONE]")


class StreamRenderer(StreamRendererBase):
    """IR stream events -> ``chat.completion.chunk`` frames for an OpenAI client."""

    def __init__(self, request: dict) -> None:
        super().__init__(request)
        self._want_usage = bool(request.get("stream_usage"))
        self._id: str | None = None
        self._created = int(time.time())
        self._tools: dict[int, int] = {}  # IR block index -> chat tool-call index

    def _start(self, event: dict) -> list[bytes]:
        if event["type"] == "start":
            self._id = event.get("id")
            self.model = event.get("model") or self.model
        self._id = self._id or wire.new_id("chatcmpl-")
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, index: int, block: dict) -> list[bytes]:
        return [self._tool_start(index, block)] if block["type"] == "tool_call" else []

    def _block_delta(self, index: int, delta: dict) -> list[bytes]:
        if "text" in delta:
            return [self._chunk({"content": delta["text"]})]
        if "reasoning" in delta:
            return [self._chunk({"reasoning_content": delta["reasoning"]})]
        if "arguments" in delta:
            frames = [] if index in self._tools else [self._tool_start(index, {})]
            call = {"index": self._tools[index], "function": {"arguments": delta["arguments"]}}
            return [*frames, self._chunk({"tool_calls": [call]})]
        return []  # signatures have no place in chat

    def _finish(self, event: dict) -> list[bytes]:
        return [self._chunk({}, IR_TO_FINISH.get(event.get("stop_reason"), "stop"))]

    def _end(self) -> list[bytes]:
        frames = [] if self.finish_event else [self._chunk({}, "stop")]
        usage = usage_to_chat(self.usage)
        if self._want_usage and usage:
            frames.append(self._frame([], usage))
        frames.append(sse.encode("[DONE]"))
        return frames

    def _error(self, message: str, kind: str) -> list[bytes]:
        return [stream_error(message, kind)]

    def _tool_start(self, index: int, block: dict) -> bytes:
        self._tools[index] = number = len(self._tools)
        call = {
            "index": number,
            "id": block.get("id") or wire.new_id("call_"),
            "type": "function",
            "function": {"name": block.get("name") or "", "arguments": ""},
        }
        return self._chunk({"tool_calls": [call]})

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._frame([choice])

    def _frame(self, choices: list[dict], usage: dict | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self.model or "",
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return wire.frame(chunk)
