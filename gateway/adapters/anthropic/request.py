"""Anthropic Messages requests: client bodies to the IR, and the IR to upstream bodies.

Beyond the IR docstring, two optional keys ride along so that Anthropic-to-Anthropic
calls lose nothing that costs money or breaks replays: ``cache_control`` on blocks, system
blocks and tools (prompt caching), and ``strict`` on tools. Thinking blocks are sent
upstream only with a signature Anthropic can have made: unsigned reasoning (from chat
clients) and OpenAI reasoning items (IR blocks with an ``id``) are left out, as the API
rejects them. Blocks the IR cannot carry (documents, server tools) are rejected.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest

from .. import parsing
from ..ir import budget_for_effort
from .response import arguments_json, block_to_anthropic

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; other formats may leave it out

MIN_THINKING_BUDGET = 1024  # the API's floor for thinking.budget_tokens

_KNOWN = frozenset(
    {
        "model", "messages", "max_tokens", "system", "stream", "temperature", "top_p", "top_k",
        "stop_sequences", "tools", "tool_choice", "thinking",
    }
)  # fmt: skip

_TOOL_CHOICES = ("auto", "any", "none", "tool")


def parse_request(body: Any) -> dict:
    """Validate a Messages body and convert it to an IR request."""
    ir = parsing.start(body, _KNOWN)
    ir["stream_usage"] = True  # Anthropic streams always carry usage
    messages = parsing.non_empty_list(body, "messages")
    ir["max_tokens"] = parsing.count(body, "max_tokens", optional=False)
    if body.get("system") is not None:
        ir["system"] = _parse_system(body["system"])
    ir["messages"] = [_parse_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    ir["temperature"] = parsing.number(body, "temperature", 0, 1)
    ir["top_p"] = parsing.number(body, "top_p", 0, 1)
    ir["top_k"] = parsing.count(body, "top_k")
    ir["stop"] = parsing.strings(body, "stop_sequences")
    tools = parsing.field(body, "tools", "an array") or []
    ir["tools"] = [_parse_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    if body.get("tool_choice") is not None:
        _parse_tool_choice(ir, parsing.field(body, "tool_choice", "an object"))
    thinking = parsing.field(body, "thinking", "an object")
    kind = None
    if thinking is not None:
        kind = parsing.required(thinking, "type", "a string", "thinking.type")
    if kind == "enabled":
        budget = parsing.count(thinking, "budget_tokens", "thinking.budget_tokens", optional=False)
        ir["reasoning"] = {"effort": None, "budget_tokens": budget, "summary": None}
    elif kind not in (None, "disabled"):
        ir["extra"]["thinking"] = thinking  # adaptive and newer modes: passed on as sent
    metadata = parsing.field(body, "metadata", "an object")  # passed on as sent
    if metadata is not None:
        parsing.field(metadata, "user_id", "a string", "metadata.user_id")
    return ir


def build_request(ir: dict, model: str, stream_usage: bool = True) -> dict:
    """Build a Messages upstream body from an IR request."""
    body: dict[str, Any] = dict(ir.get("extra") or {})
    body["model"] = model
    max_tokens = ir.get("max_tokens")
    budget = _thinking_budget(ir.get("reasoning"))
    if budget is not None:
        # The API wants max_tokens > budget_tokens >= 1024.
        if max_tokens is None:
            max_tokens = budget + DEFAULT_MAX_TOKENS
        budget = min(budget, max_tokens - 1)
        if budget >= MIN_THINKING_BUDGET:
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    body["max_tokens"] = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    system = _system_to_anthropic(ir.get("system") or [])
    if system:
        body["system"] = system
    body["messages"] = _messages_to_anthropic(ir.get("messages") or [])
    for key in ("temperature", "top_p", "top_k"):
        if ir.get(key) is not None:
            body[key] = ir[key]
    if ir.get("stop"):
        body["stop_sequences"] = ir["stop"]
    if ir.get("stream"):
        body["stream"] = True
    if ir.get("tools"):
        body["tools"] = [_tool_to_anthropic(t) for t in ir["tools"]]
        choice = _tool_choice_to_anthropic(ir.get("tool_choice"), ir.get("parallel_tool_calls"))
        if choice:
            body["tool_choice"] = choice
    return body


def _parse_system(system: Any) -> list[dict]:
    if isinstance(system, str):
        return [{"type": "text", "text": system}] if system else []
    if not isinstance(system, list):
        raise InvalidRequest("system must be a string or an array of text blocks", param="system")
    blocks = []
    for i, block in enumerate(system):
        path = f"system[{i}]"
        parsing.expect(block, "an object", path)
        if block.get("type") != "text":
            raise InvalidRequest(f"{path}.type must be 'text'", param=f"{path}.type")
        blocks.append(_with_cache_control(parsing.text_block(block, "text", path), block, path))
    return blocks


def _parse_message(message: Any, path: str) -> dict:
    parsing.expect(message, "an object", path)
    role = parsing.one_of(message.get("role"), ("user", "assistant"), f"{path}.role")
    content = message.get("content")
    if isinstance(content, str):
        blocks = [{"type": "text", "text": content}] if content else []
    elif isinstance(content, list):
        blocks = [_parse_block(b, f"{path}.content[{i}]") for i, b in enumerate(content)]
    else:
        raise InvalidRequest(
            f"{path}.content must be a string or an array of content blocks",
            param=f"{path}.content",
        )
    return {"role": role, "content": blocks}


def _parse_block(block: Any, path: str, nested: bool = False) -> dict:
    parsing.expect(block, "an object", path)
    kind = block.get("type")
    if kind == "text":
        result = parsing.text_block(block, "text", path)
    elif kind == "image":
        result = {
            "type": "image",
            "source": _parse_source(block.get("source"), f"{path}.source"),
            "detail": None,
        }
    elif kind == "tool_use" and not nested:
        tool_input = parsing.field(block, "input", "an object", f"{path}.input")
        result = {
            "type": "tool_call",
            "id": parsing.required(block, "id", "a string", f"{path}.id"),
            "name": parsing.required(block, "name", "a string", f"{path}.name"),
            "arguments": arguments_json(tool_input),
        }
    elif kind == "tool_result" and not nested:
        content = block.get("content")
        if content is None or isinstance(content, str):
            inner = [{"type": "text", "text": content}] if content else []
        elif isinstance(content, list):
            inner = [
                _parse_block(b, f"{path}.content[{i}]", nested=True) for i, b in enumerate(content)
            ]
        else:
            raise InvalidRequest(
                f"{path}.content must be a string or an array of blocks", param=f"{path}.content"
            )
        result = {
            "type": "tool_result",
            "tool_call_id": parsing.required(
                block, "tool_use_id", "a string", f"{path}.tool_use_id"
            ),
            "content": inner,
            "is_error": bool(parsing.field(block, "is_error", "a boolean", f"{path}.is_error")),
        }
    elif kind == "thinking" and not nested:
        text = parsing.required(block, "thinking", "a string", f"{path}.thinking")
        signature = parsing.field(block, "signature", "a string", f"{path}.signature")
        result = {
            "type": "reasoning",
            "text": text,
            "signature": signature or None,
            "redacted": None,
        }
    elif kind == "redacted_thinking" and not nested:
        data = parsing.required(block, "data", "a string", f"{path}.data")
        result = {"type": "reasoning", "text": "", "signature": None, "redacted": data}
    else:
        raise parsing.unsupported(kind, path)
    return _with_cache_control(result, block, path)


def _parse_source(source: Any, path: str) -> dict:
    parsing.expect(source, "an object", path)
    if source.get("type") == "base64":
        return {
            "type": "base64",
            "media_type": parsing.required(source, "media_type", "a string", f"{path}.media_type"),
            "data": parsing.required(source, "data", "a string", f"{path}.data"),
        }
    if source.get("type") == "url":
        return {"type": "url", "url": parsing.required(source, "url", "a string", f"{path}.url")}
    raise InvalidRequest(f"{path}.type must be 'base64' or 'url'", param=f"{path}.type")


def _parse_tool(tool: Any, path: str) -> dict:
    parsing.expect(tool, "an object", path)
    if tool.get("type") not in (None, "custom"):
        raise InvalidRequest(
            f"{path}.type {tool['type']!r} is not supported (custom tools only)",
            param=f"{path}.type",
        )
    parsing.required(tool, "input_schema", "an object", f"{path}.input_schema")
    result = parsing.tool(
        tool.get("name"), tool.get("description"), tool["input_schema"], tool.get("strict"), path
    )
    return _with_cache_control(result, tool, path)


def _parse_tool_choice(ir: dict, choice: dict) -> None:
    kind = parsing.one_of(choice.get("type"), _TOOL_CHOICES, "tool_choice.type")
    if kind == "tool":
        ir["tool_choice"] = {
            "type": "tool",
            "name": parsing.required(choice, "name", "a string", "tool_choice.name"),
        }
    else:
        ir["tool_choice"] = {"type": "required" if kind == "any" else kind}
    disable = parsing.field(
        choice, "disable_parallel_tool_use", "a boolean", "tool_choice.disable_parallel_tool_use"
    )
    if disable is not None:
        ir["parallel_tool_calls"] = not disable


def _with_cache_control(result: dict, wire: dict, path: str) -> dict:
    cache_control = parsing.field(wire, "cache_control", "an object", f"{path}.cache_control")
    if cache_control is not None:
        result["cache_control"] = cache_control
    return result


def _thinking_budget(reasoning: dict | None) -> int | None:
    if not reasoning:
        return None
    if reasoning.get("budget_tokens") is not None:
        return reasoning["budget_tokens"]
    return budget_for_effort(reasoning.get("effort"))


def _system_to_anthropic(blocks: list[dict]) -> str | list[dict]:
    texts = [b for b in blocks if b.get("type") == "text" and b.get("text")]
    if any("cache_control" in b for b in texts):
        return [block_to_anthropic(b) for b in texts]
    return "\n".join(b["text"] for b in texts)


def _messages_to_anthropic(messages: list[dict]) -> list[dict]:
    result: list[dict] = []
    for message in messages:
        blocks = [block_to_anthropic(b) for b in message["content"] if _sendable(b)]
        if message["role"] == "user":  # the API wants tool results before anything else
            blocks.sort(key=lambda b: b["type"] != "tool_result")
        if not blocks:
            continue
        if result and result[-1]["role"] == message["role"]:
            result[-1]["content"].extend(blocks)  # the API wants roles to alternate
        else:
            result.append({"role": message["role"], "content": blocks})
    return result


def _sendable(block: dict) -> bool:
    if block["type"] == "text":
        return bool(block["text"])  # the API rejects empty text blocks
    if block["type"] == "reasoning":
        return bool(block.get("redacted") or (block.get("signature") and "id" not in block))
    return True


def _tool_to_anthropic(tool: dict) -> dict:
    result: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description") is not None:
        result["description"] = tool["description"]
    result["input_schema"] = tool.get("parameters") or {"type": "object", "properties": {}}
    for key in ("strict", "cache_control"):
        if tool.get(key) is not None:
            result[key] = tool[key]
    return result


def _tool_choice_to_anthropic(choice: dict | None, parallel: bool | None) -> dict | None:
    if choice is None and parallel is not False:
        return None
    kind = (choice or {"type": "auto"})["type"]
    result: dict[str, Any] = {"type": {"required": "any"}.get(kind, kind)}
    if kind == "tool":
        result["name"] = choice["name"]
    if parallel is False and kind != "none":
        result["disable_parallel_tool_use"] = True
    return result
