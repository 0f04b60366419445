"""Chat Completions requests: client bodies to the IR, and the IR to upstream bodies.

The IR-to-messages conversion here is also the stored record's shape (``record.py``), as
NexusGate stores prompts in chat form.

Mapping notes: ``system``/``developer`` messages go to the IR system; ``tool`` and legacy
``function`` messages become ``tool_result`` blocks in a user message; ``reasoning_content``
(or vLLM's ``reasoning``) on assistant messages becomes reasoning blocks and is sent back
upstream (DeepSeek's thinking mode requires it with tool calls); a Responses client's
``text.format`` and ``text.verbosity`` go as ``response_format`` and ``verbosity``. Content
part types the IR cannot carry (audio, files) are rejected rather than silently dropped.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.errors import InvalidRequest

from .. import parsing
from ..ir import effort_for_budget
from ..wire import image_block, image_url
from .response import assistant_message

_KNOWN = frozenset(
    {
        "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
        "temperature", "top_p", "top_k", "stop", "tools", "tool_choice", "parallel_tool_calls",
        "reasoning_effort", "functions", "function_call",
    }
)  # fmt: skip
_CHOICE_FORMS = """'auto', 'none', 'required' or {"type": "function", "function": {"name": ...}}"""
_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# OpenAI's reasoning models reject max_tokens; other OpenAI-compatible servers (Ollama)
# only know max_tokens. The IR does not keep the client's spelling, so choose by model.
_COMPLETION_TOKENS_MODELS = re.compile(r"^(o\d|gpt-5)", re.I)


def parse_request(body: Any) -> dict:
    """Validate a Chat Completions body and convert it to an IR request."""
    ir = parsing.start(body, _KNOWN)
    for i, message in enumerate(parsing.non_empty_list(body, "messages")):
        _parse_message(ir, message, f"messages[{i}]")
    options = parsing.field(body, "stream_options", "an object")
    if options:
        ir["stream_usage"] = bool(
            parsing.field(options, "include_usage", "a boolean", "stream_options.include_usage")
        )
        rest = {k: v for k, v in options.items() if k != "include_usage"}
        if rest:
            ir["extra"]["stream_options"] = rest
    max_tokens = parsing.count(body, "max_tokens")
    completion_tokens = parsing.count(body, "max_completion_tokens")
    ir["max_tokens"] = max_tokens if completion_tokens is None else completion_tokens
    ir["temperature"] = parsing.number(body, "temperature", 0, 2)
    ir["top_p"] = parsing.number(body, "top_p", 0, 1)
    ir["top_k"] = parsing.integer(body, "top_k", -1, parsing.MAX_COUNT)  # vLLM's -1: no limit
    ir["stop"] = parsing.stop_list(body, "stop")
    _check_passed_on(body)
    ir["parallel_tool_calls"] = parsing.field(body, "parallel_tool_calls", "a boolean")
    effort = parsing.field(body, "reasoning_effort", "a string")
    if effort is not None:
        ir["reasoning"] = {"effort": effort, "budget_tokens": None, "summary": None}
    tools = parsing.field(body, "tools", "an array")
    if tools is None and body.get("functions") is not None:  # the legacy spelling
        tools = [
            {"type": "function", "function": f}
            for f in parsing.field(body, "functions", "an array")
        ]
    ir["tools"] = [_parse_tool(t, f"tools[{i}]") for i, t in enumerate(tools or [])]
    if body.get("tool_choice") is not None:
        ir["tool_choice"] = _parse_tool_choice(body["tool_choice"], "tool_choice")
    elif body.get("function_call") is not None:
        ir["tool_choice"] = _parse_tool_choice(body["function_call"], "function_call")
    return ir


_STRINGS = ("user", "service_tier", "prompt_cache_key", "safety_identifier", "verbosity")
_PASSED_ON = frozenset(
    {"n", "response_format", "seed", "top_logprobs", "presence_penalty", "frequency_penalty",
     "logit_bias", "logprobs", "store", "metadata", "modalities", *_STRINGS}
)  # fmt: skip


def _check_passed_on(body: dict) -> None:
    """Fields the IR has no place for, sent on as they are: of the types OpenAI documents.

    Most bodies have none of them: one look at the body's names says so (issue 11).
    """
    if body.keys().isdisjoint(_PASSED_ON):
        return
    parsing.integer(body, "n", 1, 128)
    response_format = parsing.field(body, "response_format", "an object")
    if response_format is not None:
        parsing.required(response_format, "type", "a string", "response_format.type")
    parsing.integer(body, "seed", *parsing.SEED)
    parsing.integer(body, "top_logprobs", 0, 20)
    for key in ("presence_penalty", "frequency_penalty"):
        parsing.number(body, key, -2, 2)
    bias = parsing.field(body, "logit_bias", "an object") or {}
    for token in bias:
        parsing.number(bias, token, -100, 100, f"logit_bias.{token}")
    parsing.typed(body, "a boolean", "logprobs", "store")
    parsing.typed(body, "a string", *_STRINGS)
    parsing.string_map(body, "metadata")
    parsing.strings(body, "modalities")


def build_request(ir: dict, model: str, stream_usage: bool = True) -> dict:
    """Build a Chat Completions upstream body from an IR request."""
    body: dict[str, Any] = dict(ir.get("extra") or {})
    body["model"] = model
    text = body.pop("text", None)  # a Responses client's: response_format and verbosity here
    if isinstance(text, dict):
        if isinstance(text.get("format"), dict):
            body["response_format"] = _response_format(text["format"])
        if text.get("verbosity") is not None:
            body["verbosity"] = text["verbosity"]
    body["messages"] = messages_to_chat(ir)
    if ir.get("stream"):
        body["stream"] = True
        if stream_usage:
            body["stream_options"] = {**body.get("stream_options", {}), "include_usage": True}
    else:
        body.pop("stream_options", None)  # OpenAI rejects stream_options without stream
    if ir.get("max_tokens") is not None:
        reasoning_model = ir.get("reasoning") or _COMPLETION_TOKENS_MODELS.match(model)
        body["max_completion_tokens" if reasoning_model else "max_tokens"] = ir["max_tokens"]
    for key in ("temperature", "top_p", "top_k", "stop"):
        if ir.get(key) is not None:
            body[key] = ir[key]
    reasoning = ir.get("reasoning")
    if reasoning:
        effort = reasoning.get("effort") or effort_for_budget(reasoning.get("budget_tokens"))
        if effort:
            body["reasoning_effort"] = effort
    if ir.get("tools"):  # OpenAI rejects tool_choice and parallel_tool_calls without tools
        body["tools"] = tools_to_chat(ir["tools"])
        if ir.get("tool_choice"):
            body["tool_choice"] = tool_choice_to_chat(ir["tool_choice"])
        if ir.get("parallel_tool_calls") is not None:
            body["parallel_tool_calls"] = ir["parallel_tool_calls"]
    return body


def messages_to_chat(ir: dict) -> list[dict]:
    """The IR system and messages as Chat Completions messages (also the record's shape)."""
    messages: list[dict] = []
    system = "\n".join(b["text"] for b in ir.get("system") or [] if b.get("type") == "text")
    if system:
        messages.append({"role": "system", "content": system})
    for message in ir.get("messages") or []:
        if message["role"] == "assistant":
            messages.append(_assistant_to_chat(message["content"]))
        else:
            messages.extend(_user_to_chat(message["content"]))
    return messages


def tools_to_chat(tools: list[dict]) -> list[dict]:
    """IR tools as Chat Completions function tools."""
    result = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool["name"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        if tool.get("parameters") is not None:
            function["parameters"] = tool["parameters"]
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        result.append({"type": "function", "function": function})
    return result


def tool_choice_to_chat(choice: dict) -> str | dict:
    """An IR tool choice in Chat Completions form."""
    if choice["type"] == "tool":
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice["type"]


def _response_format(text_format: dict) -> dict:
    """Responses' ``text.format`` as ``response_format``: a ``json_schema``'s name,
    schema and strict go inside its ``json_schema``."""
    if text_format.get("type") != "json_schema":
        return dict(text_format)
    schema = {k: v for k, v in text_format.items() if k != "type"}
    return {"type": "json_schema", "json_schema": schema}


def _parse_message(ir: dict, message: Any, path: str) -> None:
    parsing.expect(message, "an object", path)
    role = parsing.one_of(message.get("role"), _ROLES, f"{path}.role")
    parsing.field(message, "name", "a string", f"{path}.name")  # dropped, or sent on as is
    content = message.get("content")
    if role in ("system", "developer"):
        ir["system"].extend(_parse_content(content, f"{path}.content", images=False))
    elif role == "user":
        if content is None:
            raise InvalidRequest(f"{path}.content is required", param=f"{path}.content")
        ir["messages"].append(
            {"role": "user", "content": _parse_content(content, f"{path}.content")}
        )
    elif role == "assistant":
        legacy_id = f"call_legacy_{len(ir['messages'])}"  # answered by the next function message
        ir["messages"].append(
            {"role": "assistant", "content": _parse_assistant(message, path, legacy_id)}
        )
    else:
        call_id = message.get("tool_call_id") if role == "tool" else _last_legacy_call(ir)
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequest(f"{path}.tool_call_id is required", param=f"{path}.tool_call_id")
        text = "" if content is None else content
        parsing.append_tool_result(ir["messages"], call_id, _parse_content(text, f"{path}.content"))


def _parse_assistant(message: dict, path: str, legacy_id: str) -> list[dict]:
    blocks: list[dict] = []
    for key in ("reasoning_content", "reasoning"):
        reasoning = parsing.field(message, key, "a string", f"{path}.{key}")
        if reasoning:
            blocks.append(
                {"type": "reasoning", "text": reasoning, "signature": None, "redacted": None}
            )
            break
    if message.get("content") is not None:
        blocks.extend(_parse_content(message["content"], f"{path}.content", images=False))
    calls = parsing.field(message, "tool_calls", "an array", f"{path}.tool_calls") or []
    for i, call in enumerate(calls):
        call_path = f"{path}.tool_calls[{i}]"
        parsing.expect(call, "an object", call_path)
        call_id = parsing.required(call, "id", "a string", f"{call_path}.id")
        parsing.field(call, "type", "a string", f"{call_path}.type")
        blocks.append(_parse_call(call.get("function"), call_id, f"{call_path}.function"))
    if message.get("function_call") is not None:
        blocks.append(_parse_call(message["function_call"], legacy_id, f"{path}.function_call"))
    return blocks


def _parse_call(function: Any, call_id: str, path: str) -> dict:
    parsing.expect(function, "an object", path)
    name = parsing.required(function, "name", "a string", f"{path}.name")
    arguments = parsing.field(function, "arguments", "a string", f"{path}.arguments")
    return {"type": "tool_call", "id": call_id, "name": name, "arguments": arguments or ""}


def _last_legacy_call(ir: dict) -> str | None:
    for message in reversed(ir["messages"]):
        if message["role"] == "assistant":
            calls = [b["id"] for b in message["content"] if b["type"] == "tool_call"]
            return calls[-1] if calls else None
    return None


def _parse_content(content: Any, path: str, images: bool = True) -> list[dict]:
    return parsing.content_blocks(content, path, lambda part, at: _read_part(part, at, images))


def _read_part(part: dict, path: str, images: bool) -> dict | None:
    kind = part.get("type")
    if kind in ("text", "refusal"):
        return parsing.text_block(part, kind, path)
    if kind == "image_url" and images:
        image = parsing.required(part, "image_url", "an object", f"{path}.image_url")
        url = parsing.required(image, "url", "a string", f"{path}.image_url.url")
        detail = parsing.field(image, "detail", "a string", f"{path}.image_url.detail")
        return image_block(url, detail)
    return None


def _parse_tool(tool: Any, path: str) -> dict:
    parsing.expect(tool, "an object", path)
    if tool.get("type", "function") != "function":
        raise InvalidRequest(f"{path}.type must be 'function'", param=f"{path}.type")
    function = parsing.required(tool, "function", "an object", f"{path}.function")
    return parsing.tool(
        function.get("name"),
        function.get("description"),
        function.get("parameters"),
        function.get("strict"),
        f"{path}.function",
    )


def _parse_tool_choice(choice: Any, path: str) -> dict:
    if isinstance(choice, str):
        return {"type": parsing.one_of(choice, ("auto", "none", "required"), path)}
    if isinstance(choice, dict):
        if "function" in choice and choice.get("type", "function") != "function":
            raise InvalidRequest(f"{path}.type must be 'function'", param=f"{path}.type")
        function = choice.get("function") if "function" in choice else choice  # legacy: {name}
        if (
            isinstance(function, dict)
            and isinstance(function.get("name"), str)
            and function["name"]
        ):
            return {"type": "tool", "name": function["name"]}
    raise InvalidRequest(f"{path} must be {_CHOICE_FORMS}", param=path)


def _assistant_to_chat(blocks: list[dict]) -> dict:
    message = assistant_message(blocks)
    if message["content"] is None and "tool_calls" not in message:
        message["content"] = ""  # null content is only allowed beside tool calls
    return message


def _user_to_chat(blocks: list[dict]) -> list[dict]:
    # Tool messages must directly follow the assistant's calls, so they go first;
    # images inside tool results (chat tool messages carry text only) follow as user content.
    messages: list[dict] = []
    rest: list[dict] = []
    for block in blocks:
        if block["type"] == "tool_result":
            content = block.get("content") or []
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": block["tool_call_id"],
                    "content": _text_content(content),
                }
            )
            rest.extend(b for b in content if b["type"] == "image")
        else:
            rest.append(block)
    if rest or not messages:
        messages.append({"role": "user", "content": _content_to_chat(rest)})
    return messages


def _content_to_chat(blocks: list[dict]) -> str | list[dict]:
    if not blocks or (len(blocks) == 1 and blocks[0]["type"] == "text"):
        return blocks[0]["text"] if blocks else ""
    parts = []
    for block in blocks:
        if block["type"] == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif block["type"] == "image":
            image = {"url": image_url(block)}
            if block.get("detail"):
                image["detail"] = block["detail"]
            parts.append({"type": "image_url", "image_url": image})
    return parts


def _text_content(blocks: list[dict]) -> str:
    return "\n".join(b["text"] for b in blocks if b["type"] == "text")
