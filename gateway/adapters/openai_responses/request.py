"""OpenAI Responses requests: client bodies to the IR, and the IR to upstream bodies.

``input`` items map to IR messages: ``message`` items by role (system/developer to the
IR system), ``function_call`` and ``reasoning`` items join the assistant turn they belong
to, ``function_call_output`` items become ``tool_result`` blocks. Reasoning items keep
their ``id`` on the IR block (and ``encrypted_content`` as its signature) so they can be
replayed to a Responses upstream; only such blocks are sent back as reasoning items.
Item kinds the IR cannot carry (``item_reference``, hosted tool calls) are rejected.
Function tools are sent with an explicit ``strict`` (False unless the client said), as
Responses would otherwise apply its own default. A Chat Completions client's
``response_format`` and ``verbosity`` go as ``text.format`` and ``text.verbosity``.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest

from .. import parsing
from ..ir import effort_for_budget
from ..wire import image_block, image_url

_KNOWN = frozenset(
    {
        "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
        "tools", "tool_choice", "parallel_tool_calls", "reasoning",
    }
)  # fmt: skip

_ROLES = ("user", "assistant", "system", "developer")


def parse_request(body: Any) -> dict:
    """Validate a Responses body and convert it to an IR request."""
    ir = parsing.start(body, _KNOWN)
    ir["stream_usage"] = True  # response.completed always carries usage
    items = body.get("input")
    if isinstance(items, str) and items:
        ir["messages"] = [{"role": "user", "content": [{"type": "text", "text": items}]}]
    elif isinstance(items, str):
        raise InvalidRequest("input must not be empty", param="input")
    elif items is not None and not isinstance(items, list):
        raise InvalidRequest("input must be a string or an array of items", param="input")
    else:
        for i, item in enumerate(parsing.non_empty_list(body, "input")):
            _parse_item(ir, item, f"input[{i}]")
    instructions = parsing.field(body, "instructions", "a string")
    if instructions:
        ir["system"].insert(0, {"type": "text", "text": instructions})
    ir["max_tokens"] = parsing.count(body, "max_output_tokens")
    ir["temperature"] = parsing.number(body, "temperature", 0, 2)
    ir["top_p"] = parsing.number(body, "top_p", 0, 1)
    ir["parallel_tool_calls"] = parsing.field(body, "parallel_tool_calls", "a boolean")
    tools = parsing.field(body, "tools", "an array") or []
    ir["tools"] = [_parse_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    if body.get("tool_choice") is not None:
        ir["tool_choice"] = _parse_tool_choice(body["tool_choice"])
    reasoning = parsing.field(body, "reasoning", "an object")
    if reasoning:
        effort = parsing.field(reasoning, "effort", "a string", "reasoning.effort")
        summary = parsing.field(reasoning, "summary", "a string", "reasoning.summary")
        summary = summary or parsing.field(
            reasoning, "generate_summary", "a string", "reasoning.generate_summary"
        )
        if effort or summary:
            ir["reasoning"] = {"effort": effort, "budget_tokens": None, "summary": summary}
    _check_passed_on(body)
    return ir


def _check_passed_on(body: dict) -> None:
    """Fields the IR has no place for, sent on as they are: of the types OpenAI documents."""
    text = parsing.field(body, "text", "an object")
    if text is not None:
        form = parsing.field(text, "format", "an object", "text.format")
        if form is not None:
            parsing.required(form, "type", "a string", "text.format.type")
        parsing.field(text, "verbosity", "a string", "text.verbosity")
    parsing.count(body, "max_tool_calls")
    parsing.integer(body, "top_logprobs", 0, 20)
    parsing.typed(body, "a boolean", "store", "background")
    strings = ("previous_response_id", "user", "truncation", "service_tier", "prompt_cache_key")
    parsing.typed(body, "a string", *strings)
    parsing.string_map(body, "metadata")
    parsing.strings(body, "include")


def build_request(ir: dict, model: str, stream_usage: bool = True) -> dict:
    """Build a Responses upstream body from an IR request (no stop or top_k in Responses)."""
    body: dict[str, Any] = dict(ir.get("extra") or {})
    body["model"] = model
    # A Chat Completions client's output settings are Responses' text.format and verbosity.
    text: dict[str, Any] = {}
    response_format = body.pop("response_format", None)
    if isinstance(response_format, dict):
        text["format"] = _text_format(response_format)
    if body.get("verbosity") is not None:
        text["verbosity"] = body.pop("verbosity")
    if text:
        body["text"] = {**(body.get("text") or {}), **text}
    instructions = "\n".join(b["text"] for b in ir.get("system") or [] if b.get("type") == "text")
    if instructions:
        body["instructions"] = instructions
    body["input"] = [item for message in ir.get("messages") or [] for item in _items_of(message)]
    if ir.get("max_tokens") is not None:
        body["max_output_tokens"] = ir["max_tokens"]
    for key in ("temperature", "top_p"):
        if ir.get(key) is not None:
            body[key] = ir[key]
    if ir.get("stream"):
        body["stream"] = True
    if ir.get("tools"):  # tool settings without tools are noise at best
        body["tools"] = [_tool_to_responses(t) for t in ir["tools"]]
        choice = ir.get("tool_choice")
        if choice:
            tool = choice["type"] == "tool"
            body["tool_choice"] = (
                {"type": "function", "name": choice["name"]} if tool else choice["type"]
            )
        if ir.get("parallel_tool_calls") is not None:
            body["parallel_tool_calls"] = ir["parallel_tool_calls"]
    reasoning = ir.get("reasoning")
    if reasoning:
        effort = reasoning.get("effort") or effort_for_budget(reasoning.get("budget_tokens"))
        wire = {"effort": effort, "summary": reasoning.get("summary")}
        wire = {k: v for k, v in wire.items() if v}
        if wire:
            body["reasoning"] = wire
    return body


def _text_format(response_format: dict) -> dict:
    """Chat Completions' ``response_format`` as ``text.format``: a ``json_schema``'s
    name, schema and strict sit beside its type."""
    schema = response_format.get("json_schema")
    rest = {k: v for k, v in response_format.items() if k != "json_schema"}
    return {**schema, **rest} if isinstance(schema, dict) else rest


def _parse_item(ir: dict, item: Any, path: str) -> None:
    parsing.expect(item, "an object", path)
    kind = parsing.field(item, "type", "a string", f"{path}.type")
    kind = kind or ("message" if "role" in item else None)
    if kind == "message":
        role = parsing.one_of(item.get("role"), _ROLES, f"{path}.role")
        blocks = _parse_content(item.get("content"), f"{path}.content", images=role == "user")
        if role in ("system", "developer"):
            ir["system"].extend(blocks)
        elif role == "assistant":
            for block in blocks:
                parsing.append_block(ir["messages"], "assistant", block)
        else:
            ir["messages"].append({"role": "user", "content": blocks})
    elif kind == "function_call":
        block = {
            "type": "tool_call",
            "id": parsing.required(item, "call_id", "a string", f"{path}.call_id"),
            "name": parsing.required(item, "name", "a string", f"{path}.name"),
            "arguments": parsing.field(item, "arguments", "a string", f"{path}.arguments") or "",
        }
        parsing.append_block(ir["messages"], "assistant", block)
    elif kind == "function_call_output":
        output = item.get("output")
        content = _parse_content("" if output is None else output, f"{path}.output", images=True)
        call_id = parsing.required(item, "call_id", "a string", f"{path}.call_id")
        parsing.append_tool_result(ir["messages"], call_id, content)
    elif kind == "reasoning":
        summary = parsing.field(item, "summary", "an array", f"{path}.summary") or []
        content = parsing.field(item, "content", "an array", f"{path}.content") or []
        texts = [p.get("text") or "" for p in summary or content if isinstance(p, dict)]
        block = {
            "type": "reasoning",
            "text": "\n\n".join(t for t in texts if t),
            "signature": parsing.field(
                item, "encrypted_content", "a string", f"{path}.encrypted_content"
            ),
            "redacted": None,
            "id": parsing.required(item, "id", "a string", f"{path}.id"),
        }
        parsing.append_block(ir["messages"], "assistant", block)
    else:
        raise parsing.unsupported(kind, path)


def _parse_content(content: Any, path: str, images: bool) -> list[dict]:
    return parsing.content_blocks(content, path, lambda part, at: _read_part(part, at, images))


def _read_part(part: dict, path: str, images: bool) -> dict | None:
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return parsing.text_block(part, "text", path)
    if kind == "refusal":
        return parsing.text_block(part, "refusal", path)
    if kind == "input_image" and images:
        url = part.get("image_url")
        if isinstance(url, dict):  # {url} as some clients send it (NexusGate issue #62)
            url = url.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidRequest(
                f"{path}.image_url must be a URL string", param=f"{path}.image_url"
            )
        return image_block(url, parsing.field(part, "detail", "a string", f"{path}.detail"))
    return None


def _parse_tool(tool: Any, path: str) -> dict:
    parsing.expect(tool, "an object", path)
    if tool.get("type") != "function":
        raise InvalidRequest(f"{path}.type must be 'function'", param=f"{path}.type")
    return parsing.tool(
        tool.get("name"), tool.get("description"), tool.get("parameters"), tool.get("strict"), path
    )


def _parse_tool_choice(choice: Any) -> dict:
    if isinstance(choice, str):
        return {"type": parsing.one_of(choice, ("auto", "none", "required"), "tool_choice")}
    if (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("name"), str)
    ):
        return {"type": "tool", "name": choice["name"]}
    forms = """'auto', 'none', 'required' or {"type": "function", "name": ...}"""
    raise InvalidRequest(f"tool_choice must be {forms}", param="tool_choice")


def _items_of(message: dict) -> list[dict]:
    if message["role"] == "assistant":
        return _assistant_items(message["content"])
    items, parts = [], []
    for block in message["content"]:
        if block["type"] == "tool_result":
            content = block.get("content") or []
            if all(b["type"] == "text" for b in content):
                output: str | list = "\n".join(b["text"] for b in content)
            else:
                output = _parts(content)
            items.append(
                {"type": "function_call_output", "call_id": block["tool_call_id"], "output": output}
            )
        else:
            parts.append(block)
    if parts:
        items.append({"type": "message", "role": "user", "content": _parts(parts)})
    return items


def _assistant_items(blocks: list[dict]) -> list[dict]:
    items: list[dict] = []
    text: list[str] = []

    def flush() -> None:
        if text:
            items.append({"type": "message", "role": "assistant", "content": "".join(text)})
            text.clear()

    for block in blocks:
        if block["type"] == "text":
            text.append(block["text"])
        elif block["type"] == "tool_call":
            flush()
            items.append(
                {
                    "type": "function_call",
                    "call_id": block["id"],
                    "name": block["name"],
                    "arguments": block["arguments"],
                }
            )
        elif block["type"] == "reasoning" and block.get("id"):
            flush()
            summary = [{"type": "summary_text", "text": block["text"]}] if block.get("text") else []
            item = {"type": "reasoning", "id": block["id"], "summary": summary}
            if block.get("signature"):
                item["encrypted_content"] = block["signature"]
            items.append(item)
    flush()
    return items


def _parts(blocks: list[dict]) -> list[dict]:
    parts = []
    for block in blocks:
        if block["type"] == "text":
            parts.append({"type": "input_text", "text": block["text"]})
        elif block["type"] == "image":
            parts.append(
                {
                    "type": "input_image",
                    "image_url": image_url(block),
                    "detail": block.get("detail") or "auto",
                }
            )
    return parts


def _tool_to_responses(tool: dict) -> dict:
    result: dict[str, Any] = {"type": "function", "name": tool["name"]}
    if tool.get("description") is not None:
        result["description"] = tool["description"]
    result["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
    result["strict"] = bool(tool.get("strict"))
    return result
