"""The IR rendered for Anthropic Messages clients: ``message`` bodies and event streams.

Cache tokens are split back out of the IR's input count. The stream's ``message_delta``
repeats the input counts: the ``anthropic`` SDK overwrites its snapshot's counts with any
non-null ones there (``lib/streaming/_messages.py``, ``accumulate_event``), so a client
whose upstream told the input count only at the end (OpenAI) still ends with the right
totals. ``finish`` is held until ``stop`` because OpenAI upstreams send usage after the
finish reason. The SDK skips events without an ``event:`` line and raises on ``error``.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import ANTHROPIC, error_body

from . import ir, wire
from .rendering import StreamRendererBase

# IR stop reasons Anthropic lacks, and the nearest it has.
_IR_TO_STOP = {"content_filter": "refusal"}


def render_response(resp: dict, request: dict) -> dict:
    """Render an IR response as the ``message`` body the anthropic SDK parses."""
    return {
        "id": resp.get("id") or wire.new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": resp.get("model") or request.get("model"),
        "content": [block_to_anthropic(b) for b in resp.get("content") or []],
        "stop_reason": _stop_reason(resp.get("stop_reason")),
        "stop_sequence": resp.get("stop_sequence"),
        "usage": usage_to_anthropic(resp.get("usage")),
    }


def block_to_anthropic(block: dict) -> dict:
    """An IR block as an Anthropic content block (``cache_control`` kept when present)."""
    kind = block["type"]
    if kind == "text":
        result: dict[str, Any] = {"type": "text", "text": block["text"]}
    elif kind == "image":
        result = {"type": "image", "source": dict(block["source"])}
    elif kind == "tool_call":
        result = {
            "type": "tool_use",
            "id": block["id"],
            "name": block["name"],
            "input": arguments_object(block["arguments"]),
        }
    elif kind == "reasoning" and block.get("redacted"):
        result = {"type": "redacted_thinking", "data": block["redacted"]}
    elif kind == "reasoning":
        result = {
            "type": "thinking",
            "thinking": block.get("text") or "",
            "signature": block.get("signature") or "",
        }
    else:  # tool_result
        content = [block_to_anthropic(b) for b in block.get("content") or []]
        only_text = (
            len(content) == 1 and content[0]["type"] == "text" and "cache_control" not in content[0]
        )
        result = {"type": "tool_result", "tool_use_id": block["tool_call_id"]}
        result["content"] = content[0]["text"] if only_text else content
        if block.get("is_error"):
            result["is_error"] = True
    if block.get("cache_control") and kind != "reasoning":  # thinking blocks cannot be cached
        result["cache_control"] = block["cache_control"]
    return result


def usage_to_anthropic(usage: dict | None) -> dict:
    """IR usage as Anthropic usage: cache tokens split out of input, unknown counts 0."""
    usage = usage or ir.usage()
    cache_read, cache_write = usage.get("cache_read_tokens"), usage.get("cache_write_tokens")
    uncached = (usage.get("input_tokens") or 0) - (cache_read or 0) - (cache_write or 0)
    result: dict[str, Any] = {"input_tokens": max(uncached, 0)}
    if cache_write is not None:
        result["cache_creation_input_tokens"] = cache_write
    if cache_read is not None:
        result["cache_read_input_tokens"] = cache_read
    result["output_tokens"] = usage.get("output_tokens") or 0
    if usage.get("reasoning_tokens") is not None:
        result["output_tokens_details"] = {"thinking_tokens": usage["reasoning_tokens"]}
    return result


def arguments_object(arguments: str) -> dict:
    """Tool-call arguments (JSON text) as an object; ``{}`` when they are not one."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def stream_error(message: str, kind: str = "api_error") -> bytes:
    """An ``event: error`` frame; the anthropic SDK raises on it and the stream ends."""
    return wire.frame(error_body(ANTHROPIC, kind, message), event="error")


class StreamRenderer(StreamRendererBase):
    """IR stream events -> Messages stream frames for an Anthropic client.

    ``finish`` is only remembered: ``message_delta`` goes out at the end, with the final
    counts, because OpenAI upstreams send usage after the finish reason.
    """

    def __init__(self, request: dict) -> None:
        super().__init__(request)
        self._index: dict[int, int] = {}  # IR block index -> Anthropic block index
        self._open: set[int] = set()  # IR indexes of started, unstopped blocks

    def _start(self, event: dict) -> list[bytes]:
        message_id = event.get("id") if event["type"] == "start" else None
        if event["type"] == "start" and event.get("model"):
            self.model = event["model"]
        message = {
            "id": message_id or wire.new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self.model or "",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_to_anthropic(_input_side(self.usage)),
        }
        return [_emit("message_start", message=message)]

    def _block_start(self, ir_index: int, block: dict) -> list[bytes]:
        index = self._index[ir_index] = len(self._index)
        self._open.add(ir_index)
        empty = block_to_anthropic({**block, "arguments": "", "text": "", "signature": None})
        return [_emit("content_block_start", index=index, content_block=empty)]

    def _block_delta(self, ir_index: int, delta: dict) -> list[bytes]:
        frames = []
        if ir_index not in self._index:  # a delta for a block that never started
            frames = self._block_start(ir_index, _stray_block(delta))
        if "text" in delta:
            change = {"type": "text_delta", "text": delta["text"]}
        elif "reasoning" in delta:
            change = {"type": "thinking_delta", "thinking": delta["reasoning"]}
        elif "signature" in delta:
            change = {"type": "signature_delta", "signature": delta["signature"]}
        else:
            change = {"type": "input_json_delta", "partial_json": delta.get("arguments") or ""}
        return [*frames, _emit("content_block_delta", index=self._index[ir_index], delta=change)]

    def _block_stop(self, ir_index: int) -> list[bytes]:
        if ir_index not in self._open:
            return []
        self._open.discard(ir_index)
        return [_emit("content_block_stop", index=self._index[ir_index])]

    def _end(self) -> list[bytes]:
        frames = [f for i in sorted(self._open) for f in self._block_stop(i)]  # left open upstream
        finish = self.finish_event or {}
        delta = {
            "stop_reason": _stop_reason(finish.get("stop_reason")),
            "stop_sequence": finish.get("stop_sequence"),
        }
        usage = usage_to_anthropic(self.usage)
        if (self.usage or {}).get("input_tokens") is None:
            del usage["input_tokens"]  # the SDK keeps message_start's count when this is absent
        frames.append(_emit("message_delta", delta=delta, usage=usage))
        frames.append(_emit("message_stop"))
        return frames

    def _error(self, message: str, kind: str) -> list[bytes]:
        return [stream_error(message, kind)]


def _stop_reason(reason: str | None) -> str:
    return _IR_TO_STOP.get(reason or "", reason or "end_turn")


def _emit(kind: str, **fields: Any) -> bytes:
    return wire.frame({"type": kind, **fields}, kind)


def _stray_block(delta: dict) -> dict:
    block = ir._block_for_delta(delta)
    if block["type"] == "tool_call":
        block["id"] = wire.new_id("toolu_")
    return block


def _input_side(usage: dict | None) -> dict:
    names = ("input_tokens", "cache_read_tokens", "cache_write_tokens")
    return ir.usage(**{name: (usage or {}).get(name) for name in names})
