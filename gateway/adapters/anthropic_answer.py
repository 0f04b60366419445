"""Anthropic Messages answers read from an upstream: bodies and event streams to the IR.

Anthropic's ``input_tokens`` excludes cache reads and writes, the IR's includes them, so
parsing adds ``cache_read_input_tokens`` and ``cache_creation_input_tokens``. In streams,
``message_start`` carries the input counts and a placeholder ``output_tokens``;
``message_delta`` carries cumulative counts (and, from some Anthropic-compatible servers,
the real input count), so the parser keeps the latest value of each field.

Events with no data or data that is not JSON are skipped (counted in ``skipped``);
``ping`` and block types the IR has no place for (server tool results) are ignored.
"""

from __future__ import annotations

from typing import Any

from gateway import sse

from . import ir, wire

# Anthropic stop reasons the IR spells differently; the rest are the same word.
_STOP_TO_IR = {"model_context_window_exceeded": "max_tokens"}

# IR block type -> the field its content_block_start may hold, and the delta that adds to it.
_START_FIELDS = {
    "text": ("text", "text"),
    "reasoning": ("text", "reasoning"),
    "tool_call": ("arguments", "arguments"),
}

_WIRE_USAGE = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def parse_response(body: dict) -> dict:
    """Convert a Messages ``message`` body to an IR response."""
    resp = ir.empty_response()
    resp["id"], resp["model"] = body.get("id"), body.get("model")
    for block in body.get("content") or []:
        converted = block_from_anthropic(block) if isinstance(block, dict) else None
        if converted:
            resp["content"].append(converted)
    resp["stop_reason"] = stop_from_anthropic(body.get("stop_reason"))
    resp["stop_sequence"] = body.get("stop_sequence")
    resp["usage"] = usage_from_anthropic(body.get("usage"))
    return resp


def block_from_anthropic(block: dict) -> dict | None:
    """An Anthropic answer content block as an IR block (None for kinds the IR lacks)."""
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text") or ""}
    if kind == "thinking":
        return _reasoning(block.get("thinking") or "", block.get("signature") or None)
    if kind == "redacted_thinking":
        return _reasoning("", None, block.get("data"))
    if kind == "tool_use":
        arguments = arguments_json(block.get("input"))
        return {
            "type": "tool_call",
            "id": block.get("id") or "",
            "name": block.get("name") or "",
            "arguments": arguments,
        }
    return None


def stop_from_anthropic(reason: Any) -> str | None:
    """An Anthropic stop reason as an IR stop reason."""
    reason = _STOP_TO_IR.get(reason, reason)
    return reason if reason in ir.STOP_REASONS else None


def usage_from_anthropic(usage: Any) -> dict:
    """Anthropic usage as IR usage: input tokens include the cache reads and writes."""
    if not isinstance(usage, dict):
        return ir.usage()
    counts = {name: wire.count(usage.get(name)) for name in _WIRE_USAGE}
    cache_write = counts["cache_creation_input_tokens"]
    cache_read = counts["cache_read_input_tokens"]
    details = usage.get("output_tokens_details")
    thinking = wire.count(details.get("thinking_tokens")) if isinstance(details, dict) else None
    input_tokens = counts["input_tokens"]
    if input_tokens is not None:
        input_tokens += (cache_write or 0) + (cache_read or 0)
    return ir.usage(
        input_tokens=input_tokens,
        output_tokens=counts["output_tokens"],
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=thinking,
    )


def arguments_json(value: Any) -> str:
    """A tool input object as the compact JSON text OpenAI formats carry."""
    return wire.dumps(value if value is not None else {})


class StreamParser:
    """Messages stream events -> IR stream events."""

    def __init__(self) -> None:
        self.skipped = 0
        self._counts: dict[str, Any] = {}  # the latest Anthropic usage fields
        self._index: dict[int, int] = {}  # Anthropic block index -> IR block index

    def feed(self, event: sse.Event) -> list[dict]:
        """Convert one SSE event."""
        data = wire.event_data(event)
        if data is None:
            self.skipped += event.data is not None
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
            return [] if index is None else [{"type": "block_stop", "index": index}]
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
        for name in (*_WIRE_USAGE, "output_tokens_details"):
            if usage.get(name) is not None:
                self._counts[name] = usage[name]
        return usage_from_anthropic(self._counts)

    def _block_start(self, data: dict) -> list[dict]:
        block = block_from_anthropic(data.get("content_block") or {})
        if block is None or not isinstance(data.get("index"), int):
            return []
        index = self._index[data["index"]] = len(self._index)
        # The IR starts blocks empty; anything the start already holds follows as a delta.
        key, delta_key = _START_FIELDS[block["type"]]
        held = "" if block[key] == "{}" else block[key]
        events = [{"type": "block_start", "index": index, "block": {**block, key: ""}}]
        if held:
            events.append({"type": "block_delta", "index": index, "delta": {delta_key: held}})
        return events

    def _block_delta(self, data: dict) -> list[dict]:
        index = self._index.get(data.get("index"))
        delta = data.get("delta") or {}
        field, value = {
            "text_delta": ("text", delta.get("text")),
            "thinking_delta": ("reasoning", delta.get("thinking")),
            "signature_delta": ("signature", delta.get("signature")),
            "input_json_delta": ("arguments", delta.get("partial_json")),
        }.get(delta.get("type"), (None, None))
        if index is None or field is None or not value:
            return []
        return [{"type": "block_delta", "index": index, "delta": {field: value}}]


def _reasoning(text: str, signature: str | None, redacted: str | None = None) -> dict:
    return {"type": "reasoning", "text": text, "signature": signature, "redacted": redacted}
