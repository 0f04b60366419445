"""Chat Completions answers, both ways: ``chat.completion`` bodies to the IR and back.

Reads what OpenAI-compatible servers send beyond OpenAI: ``reasoning_content``
(DeepSeek) and ``reasoning`` (vLLM), vLLM's ``stop_reason`` (the matched stop string),
DeepSeek's ``prompt_cache_hit_tokens``. Renders what the ``openai`` SDK parses. Finish
reasons and usage are mapped here both ways, for bodies and for streams.
"""

from __future__ import annotations

import time
from typing import Any

from .. import ir, wire

# Finish reasons to IR stop reasons, and back.
FINISH_TO_IR = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "content_filter",
}

IR_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "content_filter": "content_filter",
    "refusal": "content_filter",
}


def parse_response(body: dict) -> dict:
    """Convert a ``chat.completion`` body to an IR response: the first choice, and the
    others' content for the record (``more``: only a client of this format asks for
    more than one, with ``n``, and gets them as the upstream sent them).

    An error body (``{"error": ...}`` or ``{"object": "error"}``, as in a stream) raises
    ``wire.ErrorAnswer``.
    """
    if (body.get("error") or body.get("object") == "error") and not body.get("choices"):
        raise wire.error_answer(body.get("error") or body, body.get("message"))
    resp = ir.empty_response()
    resp["id"], resp["model"] = body.get("id"), body.get("model")
    choice = first_choice(body) or {}
    resp["content"] = _blocks(choice.get("message") or {})
    resp["stop_reason"], resp["stop_sequence"] = stop_of(choice)
    resp["usage"] = usage_from_chat(body.get("usage")) or ir.usage()
    more = sorted(
        (c for c in body.get("choices") or [] if isinstance(c, dict) and c is not choice),
        key=lambda c: wire.count(c.get("index")) or 0,
    )
    if more:
        resp["more"] = [_blocks(c.get("message") or {}) for c in more]
    return resp


def _blocks(message: dict) -> list[dict]:
    """An assistant message's IR blocks: reasoning, text (or a refusal), tool calls."""
    blocks = []
    reasoning = reasoning_of(message)
    if reasoning:
        blocks.append(_reasoning_block(reasoning))
    text = content_text(message.get("content")) or message.get("refusal")
    if isinstance(text, str) and text:
        blocks.append({"type": "text", "text": text})
    for call in calls_of(message):
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_call",
                "id": call.get("id") or wire.new_id("call_"),
                "name": function.get("name") or "",
                "arguments": wire.arguments(function.get("arguments")),
            }
        )
    return blocks


def content_text(content: Any) -> Any:
    """A message's or delta's content; the text of its parts when it is a list of them, as
    some servers send (Mistral: text parts beside ``thinking`` parts, which are not text)."""
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return content


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
    for number, blocks in enumerate(resp.get("more") or [], 1):  # a repeat's, of an ``n`` call
        more = assistant_message(blocks)
        finish = "tool_calls" if more.get("tool_calls") else "stop"
        choice = {"index": number, "message": more, "logprobs": None, "finish_reason": finish}
        body["choices"].append(choice)
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


def usage_from_chat(usage: Any) -> dict | None:
    """An OpenAI ``usage`` object as IR usage (None when there is none)."""
    if not isinstance(usage, dict):
        return None
    prompt = wire.details(usage, "prompt_tokens_details")
    completion = wire.details(usage, "completion_tokens_details")
    cache_read = prompt.get("cached_tokens")
    if cache_read is None:
        cache_read = usage.get("prompt_cache_hit_tokens")  # DeepSeek
    return ir.usage(
        input_tokens=wire.count(usage.get("prompt_tokens")),
        output_tokens=wire.count(usage.get("completion_tokens")),
        cache_read_tokens=wire.count(cache_read),
        cache_write_tokens=wire.count(prompt.get("cache_write_tokens")),
        reasoning_tokens=wire.count(completion.get("reasoning_tokens")),
    )


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


def first_choice(body: dict) -> dict | None:
    """The choice with index 0 of a body or chunk (the only one the IR keeps)."""
    for choice in body.get("choices") or []:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None


def reasoning_of(message: dict) -> str | None:
    """A message's or delta's reasoning text, as DeepSeek or vLLM spell it."""
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def calls_of(message: dict) -> list[dict]:
    """A message's or delta's tool calls (a legacy ``function_call`` as call 0)."""
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        return [c for c in calls if isinstance(c, dict)]
    legacy = message.get("function_call")
    return [{"index": 0, "function": legacy}] if isinstance(legacy, dict) else []


def stop_of(choice: dict) -> tuple[str | None, str | None]:
    """A choice's IR stop reason and stop sequence."""
    finish = choice.get("finish_reason")
    matched = choice.get("stop_reason")  # vLLM: the stop string that ended the answer
    if finish == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    if not finish:
        return None, None
    return FINISH_TO_IR.get(finish, "end_turn"), None


def _reasoning_block(text: str) -> dict:
    return {"type": "reasoning", "text": text, "signature": None, "redacted": None}
