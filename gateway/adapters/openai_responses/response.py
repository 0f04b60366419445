"""OpenAI Responses answers, both ways: ``response`` bodies to the IR and back.

Output items map to IR blocks: ``message`` parts (``output_text``, ``refusal``) to text,
``reasoning`` items to reasoning blocks (summary text, or ``reasoning_text`` content for
open models; ``encrypted_content`` as the signature; the item ``id`` kept), and
``function_call`` items to tool calls (``call_id`` is the IR id). ``status`` gives the
stop reason: ``completed`` is ``tool_use`` when the output has function calls,
``incomplete`` is ``max_tokens`` (or ``content_filter``), and back. Reasoning is rendered
as a reasoning summary, which is what Responses clients display.
"""

from __future__ import annotations

import time
from typing import Any

from .. import ir, wire

# IR stop reasons that end a response as incomplete, and the reason Responses gives.
_INCOMPLETE = {"max_tokens": "max_output_tokens", "content_filter": "content_filter"}


def parse_response(body: dict) -> dict:
    """Convert a Responses ``response`` body to an IR response; a failed response
    (``status: "failed"``) or an error body raises ``wire.ErrorAnswer``."""
    if body.get("status") == "failed" or (body.get("error") and not body.get("output")):
        raise wire.error_answer(body.get("error"), "the response failed")
    resp = ir.empty_response()
    resp["id"], resp["model"] = body.get("id"), body.get("model")
    for item in body.get("output") or []:
        if isinstance(item, dict):
            resp["content"].extend(blocks_of(item))
    resp["stop_reason"] = stop_of(body)
    resp["usage"] = usage_from_responses(body.get("usage"))
    return resp


def render_response(resp: dict, request: dict) -> dict:
    """Render an IR response as the ``response`` body the openai SDK parses."""
    output = []
    for block in resp.get("content") or []:
        item = item_for(block)
        if item is not None:
            output.append(finished(item, block))
    return response_object(
        resp.get("id") or wire.new_id("resp_"),
        resp.get("model") or request.get("model"),
        request,
        output=output,
        stop_reason=resp.get("stop_reason"),
        usage=resp.get("usage"),
    )


def response_object(
    response_id: str,
    model: str | None,
    request: dict,
    output: list[dict] | None = None,
    stop_reason: str | None = None,
    usage: dict | None = None,
    status: str | None = None,
    error: dict | None = None,
) -> dict:
    """A ``response`` object; status from the stop reason unless given."""
    incomplete = _INCOMPLETE.get(stop_reason or "")
    status = status or ("incomplete" if incomplete else "completed")
    system = "\n".join(b["text"] for b in request.get("system") or [] if b.get("type") == "text")
    choice = request.get("tool_choice") or {"type": "auto"}
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": error,
        "incomplete_details": {"reason": incomplete} if status == "incomplete" else None,
        "instructions": system or None,
        "max_output_tokens": request.get("max_tokens"),
        "model": model or "",
        "output": output or [],
        "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
        "temperature": request.get("temperature"),
        "tool_choice": {"type": "function", "name": choice["name"]}
        if choice["type"] == "tool"
        else choice["type"],
        "tools": [],
        "top_p": request.get("top_p"),
        "usage": usage_to_responses(usage),
    }


def stop_of(response: dict, saw_calls: bool = False) -> str | None:
    """The IR stop reason of a Responses ``response`` object."""
    status = response.get("status")
    if status == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return "content_filter" if reason == "content_filter" else "max_tokens"
    if status == "completed":
        calls = saw_calls or any(
            isinstance(i, dict) and i.get("type") == "function_call"
            for i in response.get("output") or []
        )
        return "tool_use" if calls else "end_turn"
    return None


def usage_from_responses(usage: Any) -> dict:
    """Responses usage as IR usage."""
    if not isinstance(usage, dict):
        return ir.usage()
    details = wire.details(usage, "input_tokens_details")
    output_details = wire.details(usage, "output_tokens_details")
    return ir.usage(
        input_tokens=wire.count(usage.get("input_tokens")),
        output_tokens=wire.count(usage.get("output_tokens")),
        cache_read_tokens=wire.count(details.get("cached_tokens")),
        cache_write_tokens=wire.count(details.get("cache_write_tokens")),
        reasoning_tokens=wire.count(output_details.get("reasoning_tokens")),
    )


def usage_to_responses(usage: dict | None) -> dict | None:
    """IR usage as Responses usage (detail counts the SDK requires are 0 when unknown)."""
    if not usage or (usage.get("input_tokens") is None and usage.get("output_tokens") is None):
        return None
    input_tokens, output_tokens = usage.get("input_tokens") or 0, usage.get("output_tokens") or 0
    input_details: dict[str, int] = {"cached_tokens": usage.get("cache_read_tokens") or 0}
    if usage.get("cache_write_tokens") is not None:
        input_details["cache_write_tokens"] = usage["cache_write_tokens"]
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": input_details,
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.get("reasoning_tokens") or 0},
        "total_tokens": input_tokens + output_tokens,
    }


def blocks_of(item: dict) -> list[dict]:
    """The IR blocks of a finished output item (none for hosted tool calls)."""
    kind = item.get("type")
    if kind == "message":
        parts = [p for p in item.get("content") or [] if isinstance(p, dict)]
        texts = [
            p.get("text") if p.get("type") == "output_text" else p.get("refusal") for p in parts
        ]
        return [{"type": "text", "text": t} for t in texts if isinstance(t, str) and t]
    if kind == "reasoning":
        parts = item.get("summary") or item.get("content") or []
        text = "\n\n".join(p.get("text") or "" for p in parts if isinstance(p, dict))
        block = {
            "type": "reasoning",
            "text": text,
            "signature": item.get("encrypted_content"),
            "redacted": None,
        }
        return [{**block, "id": item.get("id")}]
    if kind == "function_call":
        call_id = item.get("call_id") or item.get("id") or ""
        return [
            {
                "type": "tool_call",
                "id": call_id,
                "name": item.get("name") or "",
                "arguments": wire.arguments(item.get("arguments")),
            }
        ]
    return []


def item_for(block: dict) -> dict | None:
    """The in-progress output item for an IR block (None for blocks with no item)."""
    kind = block["type"]
    if kind == "text":
        return {
            "id": wire.new_id("msg_"),
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
    if kind == "reasoning":
        return {"id": block.get("id") or wire.new_id("rs_"), "type": "reasoning", "summary": []}
    if kind == "tool_call":
        return {
            "id": wire.new_id("fc_"),
            "type": "function_call",
            "status": "in_progress",
            "arguments": "",
            "call_id": block.get("id") or wire.new_id("call_"),
            "name": block.get("name") or "",
        }
    return None


def finished(item: dict, block: dict) -> dict:
    """The completed form of an output item, filled from its whole IR block."""
    item = dict(item)
    if item["type"] == "message":
        item.update(status="completed", content=[text_part(block.get("text") or "")])
    elif item["type"] == "reasoning":
        text = block.get("text") or ""
        item["summary"] = [{"type": "summary_text", "text": text}] if text else []
        if block.get("signature"):
            item["encrypted_content"] = block["signature"]
    else:
        item.update(status="completed", arguments=block.get("arguments") or "")
    return item


def text_part(text: str) -> dict:
    """An ``output_text`` content part."""
    return {"type": "output_text", "text": text, "annotations": []}
