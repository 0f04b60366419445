"""Anthropic Messages answers, both ways: ``message`` bodies to the IR and back.

Anthropic's ``input_tokens`` excludes cache reads and writes, the IR's includes them, so
reading adds ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` and rendering
splits them back out (with ``cache_creation``'s 1-hour writes, which cost more). Content blocks, stop reasons and usage are mapped here both ways,
for requests, bodies and streams.
"""

from __future__ import annotations

import json
from typing import Any

from .. import ir, wire

# Anthropic stop reasons the IR spells differently; the rest are the same word.
_STOP_TO_IR = {"model_context_window_exceeded": "max_tokens"}

# IR stop reasons Anthropic lacks, and the nearest it has.
_IR_TO_STOP = {"content_filter": "refusal"}

WIRE_USAGE = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def parse_response(body: dict) -> dict:
    """Convert a Messages ``message`` body to an IR response; an error body
    (``{"type": "error", "error": ...}``) raises ``wire.ErrorAnswer``."""
    if body.get("type") == "error":
        raise wire.error_answer(body.get("error"))
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


def render_response(resp: dict, request: dict) -> dict:
    """Render an IR response as the ``message`` body the anthropic SDK parses."""
    return {
        "id": resp.get("id") or wire.new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": resp.get("model") or request.get("model"),
        "content": [block_to_anthropic(b) for b in resp.get("content") or []],
        "stop_reason": stop_to_anthropic(resp.get("stop_reason")),
        "stop_sequence": resp.get("stop_sequence"),
        "usage": usage_to_anthropic(resp.get("usage")),
    }


def block_from_anthropic(block: dict) -> dict | None:
    """An Anthropic answer content block as an IR block (None for kinds the IR lacks).

    Its strings must be strings (null is empty): ValueError, an unusable answer, if not.
    """
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": string(block, "text")}
    if kind == "thinking":
        return _reasoning(string(block, "thinking"), string(block, "signature") or None)
    if kind == "redacted_thinking":
        return _reasoning("", None, string(block, "data") or None)
    if kind == "tool_use":
        arguments = arguments_json(block.get("input"))
        return {
            "type": "tool_call",
            "id": string(block, "id"),
            "name": string(block, "name"),
            "arguments": arguments,
        }
    return None


def string(obj: dict, key: str) -> str:
    """``obj[key]``, a string of an answer's text ("" when absent or null); ValueError if it
    is anything else: the IR, its renderers and the record take text as strings only."""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"the upstream's {key} is not a string: {wire.dumps(value)[:100]}")
    return value


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


def stop_from_anthropic(reason: Any) -> str | None:
    """An Anthropic stop reason as an IR stop reason."""
    reason = _STOP_TO_IR.get(reason, reason)
    return reason if reason in ir.STOP_REASONS else None


def stop_to_anthropic(reason: str | None) -> str:
    """An IR stop reason as an Anthropic one (the nearest, where Anthropic lacks it)."""
    return _IR_TO_STOP.get(reason or "", reason or "end_turn")


def usage_from_anthropic(usage: Any) -> dict:
    """Anthropic usage as IR usage: input tokens include the cache reads and writes."""
    if not isinstance(usage, dict):
        return ir.usage()
    counts = {name: wire.count(usage.get(name)) for name in WIRE_USAGE}
    cache_write = counts["cache_creation_input_tokens"]
    cache_read = counts["cache_read_input_tokens"]
    details = usage.get("output_tokens_details")
    thinking = wire.count(details.get("thinking_tokens")) if isinstance(details, dict) else None
    # cache_creation splits the writes by lifetime; 1-hour writes are priced apart.
    lifetimes = usage.get("cache_creation")
    hour = (
        wire.count(lifetimes.get("ephemeral_1h_input_tokens"))
        if isinstance(lifetimes, dict)
        else None
    )
    input_tokens = counts["input_tokens"]
    if input_tokens is not None:
        input_tokens += (cache_write or 0) + (cache_read or 0)
    return ir.usage(
        input_tokens=input_tokens,
        output_tokens=counts["output_tokens"],
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=hour,
        reasoning_tokens=thinking,
    )


def usage_to_anthropic(usage: dict | None) -> dict:
    """IR usage as Anthropic usage: cache tokens split out of input, unknown counts 0."""
    usage = usage or ir.usage()
    cache_read, cache_write = usage.get("cache_read_tokens"), usage.get("cache_write_tokens")
    uncached = (usage.get("input_tokens") or 0) - (cache_read or 0) - (cache_write or 0)
    result: dict[str, Any] = {"input_tokens": max(uncached, 0)}
    if cache_write is not None:
        result["cache_creation_input_tokens"] = cache_write
        hour = usage.get("cache_write_1h_tokens")
        if hour is not None:
            result["cache_creation"] = {
                "ephemeral_5m_input_tokens": max(cache_write - hour, 0),
                "ephemeral_1h_input_tokens": hour,
            }
    if cache_read is not None:
        result["cache_read_input_tokens"] = cache_read
    result["output_tokens"] = usage.get("output_tokens") or 0
    if usage.get("reasoning_tokens") is not None:
        result["output_tokens_details"] = {"thinking_tokens": usage["reasoning_tokens"]}
    return result


def arguments_json(value: Any) -> str:
    """A tool input object as the compact JSON text OpenAI formats carry."""
    return wire.dumps(value if value is not None else {})


def arguments_object(arguments: str) -> dict:
    """Tool-call arguments (JSON text) as an object; ``{}`` when they are not one."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _reasoning(text: str, signature: str | None, redacted: str | None = None) -> dict:
    return {"type": "reasoning", "text": text, "signature": signature, "redacted": redacted}
