"""A GenAI span's opt-in content: the prompt's messages, its tool definitions and the
answer, in the convention's message schema, as JSON strings (``gen_ai.input.messages``,
``gen_ai.tool.definitions``, ``gen_ai.output.messages``).

Only when the operator opted in (``telemetry.captures_content``); ``spans.build`` calls
``content``. A text part past ``limit`` characters is cut, saying how much more there
was; a part of another kind is named by its type only, so nothing unbounded leaks.
Input is the stored record's prompt and completion (Chat Completions messages). Pure
code: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?:;[^,]*)?,(?P<data>.*)", re.DOTALL)


def content(row: Mapping[str, Any], finish: str | None, limit: int = 0) -> dict[str, str]:
    """The convention's opt-in content attributes, as JSON strings (structured values are
    not yet supported on spans)."""
    prompt = row.get("prompt") if isinstance(row.get("prompt"), Mapping) else {}
    attrs = {}
    messages = prompt.get("messages")
    if isinstance(messages, list):
        attrs["gen_ai.input.messages"] = _json([_message(m, limit) for m in messages])
    tools = prompt.get("tools")
    if isinstance(tools, list) and tools:
        definitions = [
            {"type": t.get("type", "function"), "name": (t.get("function") or {}).get("name")}
            for t in tools
            if isinstance(t, Mapping)
        ]
        attrs["gen_ai.tool.definitions"] = _json(definitions)
    answer = row.get("completion")
    if isinstance(answer, list) and answer:
        if finish is None:  # required in an output message; the record did not say
            finish = "error" if row.get("status") == "failed" else "unknown"
        attrs["gen_ai.output.messages"] = _json(
            [{**_message(m, limit), "finish_reason": finish} for m in answer]
        )
    return attrs


def _message(message: Any, limit: int) -> dict[str, Any]:
    """A stored Chat Completions message in the convention's message schema."""
    if not isinstance(message, Mapping):
        return {"role": "user", "parts": []}
    role = message.get("role") or "user"
    if role == "tool":
        part = {
            "type": "tool_call_response",
            "id": message.get("tool_call_id"),
            "response": _cut(_text(message.get("content")), limit),
        }
        return {"role": role, "parts": [part]}
    parts: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        parts.append({"type": "reasoning", "content": _cut(message["reasoning_content"], limit)})
    parts.extend(_parts(message.get("content"), limit))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": function.get("name"),
                "arguments": _arguments(function.get("arguments"), limit),
            }
        )
    return {"role": role, "parts": parts}


def _parts(value: Any, limit: int) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "text", "content": _cut(value, limit)}] if value else []
    parts = []
    for part in value if isinstance(value, list) else []:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            parts.append({"type": "text", "content": _cut(part.get("text") or "", limit)})
        elif kind == "image_url":
            parts.append(_image((part.get("image_url") or {}).get("url") or "", limit))
        elif kind:
            parts.append({"type": kind})  # known by its type only: nothing unbounded leaks
    return parts


def _image(url: str, limit: int) -> dict[str, Any]:
    match = _DATA_URL.fullmatch(url)
    if match:
        return {
            "type": "blob",
            "modality": "image",
            "mime_type": match["mime"] or None,
            "content": _cut(match["data"], limit),
        }
    return {"type": "uri", "modality": "image", "uri": url}


def _arguments(arguments: Any, limit: int) -> Any:
    """Tool call arguments as an object where they parse (the convention asks for one)."""
    if not isinstance(arguments, str):
        return arguments
    if limit and len(arguments) > limit:
        return _cut(arguments, limit)
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "".join(p.get("text") or "" for p in value if isinstance(p, Mapping))
    return value if isinstance(value, str) else ""


def _cut(text: str, limit: int) -> str:
    if not limit or len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
