"""Anthropic Messages streams, both ways: upstream events to IR events, IR events to events.

Reading: ``message_start`` carries the input counts and a placeholder ``output_tokens``;
``message_delta`` carries cumulative counts (and, from some Anthropic-compatible servers,
the real input count), so the parser keeps the latest value of each field. Events with no
data or blank data are keep-alives; data that is not JSON is counted in ``skipped``;
``ping`` and block types the IR has no place for (server tool results) are ignored.

Writing: the stream's ``message_delta`` repeats the input counts: the ``anthropic`` SDK
overwrites its snapshot's counts with any non-null ones there
(``lib/streaming/_messages.py``, ``accumulate_event``), so a client whose upstream told the
input count only at the end (OpenAI) still ends with the right totals. ``finish`` is held
until ``stop`` because OpenAI upstreams send usage after the finish reason. The SDK skips
events without an ``event:`` line and raises on ``error``.
"""

from __future__ import annotations

from typing import Any

from gateway import sse
from gateway.errors import ANTHROPIC, error_body

from .. import ir, wire
from ..rendering import StreamRendererBase
from .response import (
    WIRE_USAGE,
    block_from_anthropic,
    block_to_anthropic,
    stop_from_anthropic,
    stop_to_anthropic,
    string,
    usage_from_anthropic,
    usage_to_anthropic,
)


class StreamParser:
    """Messages stream events -> IR stream events."""

    # Events that open a stream and carry nothing a client could use: an error after
    # only these (an overloaded model, after its start) fails over (``Response.events``).
    PREFACE = frozenset({"message_start", "ping"})

    def __init__(self) -> None:
        self.skipped = 0
        self._counts: dict[str, Any] = {}  # the latest Anthropic usage fields
        self._index: dict[int, int] = {}  # Anthropic block index -> IR block index
        self._no_input: set[int] = set()  # IR indexes of tool calls with no input yet
        self._elsewhere: set[int] = set()  # Anthropic indexes of blocks the IR has no place for

    def feed(self, event: sse.Event) -> list[dict]:
        """Convert one SSE event."""
        data = wire.event_data(event)
        if data is None:
            self.skipped += not wire.blank(event)
            return []
        kind = data.get("type") or event.event
        if kind == "message_start":
            message = data.get("message") or {}
            # output_tokens here is a placeholder; the real count comes with message_delta.
            usage = {k: v for k, v in (message.get("usage") or {}).items() if k != "output_tokens"}
            return [
                {
                    "type": "start",
                    "id": message.get("id"),
                    "model": message.get("model"),
                    "usage": self._usage(usage),
                }
            ]
        if kind == "content_block_start":
            return self._block_start(data)
        if kind == "content_block_delta":
            return self._block_delta(data)
        if kind == "content_block_stop":
            index = self._index.get(data.get("index"))
            if index is None:
                return []
            stop = {"type": "block_stop", "index": index}
            if index in self._no_input:  # its ``{}`` came with the start alone
                self._no_input.discard(index)
                return [{"type": "block_delta", "index": index, "delta": {"arguments": "{}"}}, stop]
            return [stop]
        if kind == "message_delta":
            delta = data.get("delta") or {}
            return [
                {
                    "type": "finish",
                    "stop_reason": stop_from_anthropic(delta.get("stop_reason")),
                    "stop_sequence": delta.get("stop_sequence"),
                    "usage": self._usage(data.get("usage") or {}),
                }
            ]
        if kind == "message_stop":
            return [{"type": "stop"}]
        if kind == "error":
            error = data.get("error") if isinstance(data.get("error"), dict) else {}
            return [
                {
                    "type": "error",
                    "message": error.get("message") or "upstream error",
                    "error_type": error.get("type"),
                }
            ]
        return []  # ping, and events the IR has no place for

    def finish(self) -> list[dict]:
        """End of the upstream bytes; Anthropic's own terminal event is ``message_stop``."""
        return []

    def _usage(self, usage: dict) -> dict:
        for name in (*WIRE_USAGE, "output_tokens_details", "cache_creation"):
            if usage.get(name) is not None:
                self._counts[name] = usage[name]
        return usage_from_anthropic(self._counts)

    def _block_start(self, data: dict) -> list[dict]:
        block = block_from_anthropic(data.get("content_block") or {})
        if not isinstance(data.get("index"), int):
            return []
        if block is None:
            self._elsewhere.add(data["index"])  # its deltas are not the answer's either
            return []
        index = self._index[data["index"]] = len(self._index)
        # The IR starts blocks empty; anything the start already holds follows as a delta.
        key, delta_key = ir.BLOCK_FIELDS[block["type"]]
        held = "" if block[key] == "{}" else block[key]
        events = [{"type": "block_start", "index": index, "block": {**block, key: ""}}]
        if held:
            events.append({"type": "block_delta", "index": index, "delta": {delta_key: held}})
        elif block["type"] == "tool_call":  # its input follows in pieces, or was ``{}``
            self._no_input.add(index)
        return events

    def _block_delta(self, data: dict) -> list[dict]:
        delta = data.get("delta") or {}
        field, key = _DELTAS.get(delta.get("type"), (None, None))
        if field is None or not isinstance(data.get("index"), int):
            return []
        value = string(delta, key)  # ValueError (a stream it cannot read) if not a string
        if not value:
            return []
        index = self._index.get(data["index"])
        events = []
        if index is None and data["index"] in self._elsewhere:
            return []
        if index is None:  # its block never started (a sloppy upstream): it starts here
            index = self._index[data["index"]] = len(self._index)
            block = ir.block_for_delta({field: value})
            if block["type"] == "tool_call":
                block["id"] = wire.new_id("toolu_")
            events.append({"type": "block_start", "index": index, "block": block})
        self._no_input.discard(index)
        return [*events, {"type": "block_delta", "index": index, "delta": {field: value}}]


# A content_block_delta's type -> the IR delta it is, and the field that holds its text.
_DELTAS = {
    "text_delta": ("text", "text"),
    "thinking_delta": ("reasoning", "thinking"),
    "signature_delta": ("signature", "signature"),
    "input_json_delta": ("arguments", "partial_json"),
}


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
            "stop_reason": stop_to_anthropic(finish.get("stop_reason")),
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


def _emit(kind: str, **fields: Any) -> bytes:
    return wire.frame({"type": kind, **fields}, kind)


def _stray_block(delta: dict) -> dict:
    block = ir.block_for_delta(delta)
    if block["type"] == "tool_call":
        block["id"] = wire.new_id("toolu_")
    return block


def _input_side(usage: dict | None) -> dict:
    names = ("input_tokens", "cache_read_tokens", "cache_write_tokens")
    return ir.usage(**{name: (usage or {}).get(name) for name in names})
