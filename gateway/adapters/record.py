"""The stored shape of a call's prompt and completion, the same whatever the protocols.

NexusGate stores both in Chat Completions form, so the dashboard and its API consumers
read one shape: ``prompt`` is ``{messages, tools?, tool_choice?, params, extraBody?,
extraHeaders?}`` and ``completion`` is a list holding the assistant message (one for each
choice, for a client that asked for several with ``n``).
Reasoning is kept as ``reasoning_content`` beside the text, not folded into it as
``<think>`` (NexusGate's early shape). The message conversion is the chat adapter's own.
"""

from __future__ import annotations

from typing import Any

from .openai_chat.request import messages_to_chat, tool_choice_to_chat, tools_to_chat
from .openai_chat.response import assistant_message

_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "stream", "reasoning")


def prompt(request: dict, extra_headers: dict | None = None) -> dict:
    """The prompt record of an IR request."""
    record: dict[str, Any] = {"messages": messages_to_chat(request)}
    if request.get("tools"):
        record["tools"] = tools_to_chat(request["tools"])
    if request.get("tool_choice"):
        record["tool_choice"] = tool_choice_to_chat(request["tool_choice"])
    record["params"] = {k: request[k] for k in _PARAMS if request.get(k) is not None}
    if request.get("extra"):
        record["extraBody"] = request["extra"]
    if extra_headers:
        record["extraHeaders"] = extra_headers
    return record


def completion(resp: dict) -> list[dict]:
    """The completion record of an IR response: its message, then one for each more
    choice a client asked for (``n``)."""
    more = [assistant_message(blocks) for blocks in resp.get("more") or []]
    return [assistant_message(resp.get("content") or []), *more]
