"""OpenAI Chat Completions answers read from an upstream: bodies and chunk streams to the IR.

Accepts what OpenAI-compatible servers send beyond OpenAI: ``reasoning_content``
(DeepSeek) and ``reasoning`` (vLLM), vLLM's ``stop_reason`` (the matched stop string),
DeepSeek's ``prompt_cache_hit_tokens``, error chunks spelled ``{"error": {...}}`` or
``{"object": "error", ...}``. Stream data that is not JSON (keep-alive noise) is skipped
and counted in ``StreamParser.skipped``; it never fails the stream. A usage-only chunk
(``choices: []``) yields a ``usage`` event and nothing else, so a relay can hide it from
clients that did not ask for usage.
"""

from __future__ import annotations

from typing import Any

from gateway import sse

from . import ir, wire

FINISH_TO_IR = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "content_filter",
}


def parse_response(body: dict) -> dict:
    """Convert a ``chat.completion`` body to an IR response (first choice only)."""
    resp = ir.empty_response()
    resp["id"], resp["model"] = body.get("id"), body.get("model")
    choice = _first_choice(body) or {}
    message = choice.get("message") or {}
    reasoning = _reasoning_of(message)
    if reasoning:
        resp["content"].append(_reasoning_block(reasoning))
    text = message.get("content")
    if isinstance(text, list):  # some servers answer with content parts
        text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
    text = text or message.get("refusal")
    if isinstance(text, str) and text:
        resp["content"].append({"type": "text", "text": text})
    for call in _calls_of(message):
        function = call.get("function") or {}
        resp["content"].append(
            {
                "type": "tool_call",
                "id": call.get("id") or wire.new_id("call_"),
                "name": function.get("name") or "",
                "arguments": function.get("arguments") or "",
            }
        )
    resp["stop_reason"], resp["stop_sequence"] = _stop_of(choice)
    resp["usage"] = usage_from_chat(body.get("usage")) or ir.usage()
    return resp


def usage_from_chat(usage: Any) -> dict | None:
    """An OpenAI ``usage`` object as IR usage (None when there is none)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens_details") or {}
    completion = usage.get("completion_tokens_details") or {}
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


class StreamParser:
    """Chat Completions chunks -> IR stream events.

    A stream that ends after a ``finish_reason`` but without ``[DONE]`` (some servers
    omit it) still gets its ``stop`` from ``finish()``: the answer is whole.
    """

    def __init__(self) -> None:
        self.skipped = 0
        self._started = False
        self._finished = False
        self._stopped = False
        self._open: int | None = None  # IR index of the open block
        self._open_kind: str | None = None
        self._tools: dict[int, int] = {}  # chat tool-call index -> IR block index
        self._last_call: tuple[int, str | None] = (0, None)  # chat index and id of the latest
        self._next = 0

    def feed(self, event: sse.Event) -> list[dict]:
        """Convert one SSE event."""
        if self._stopped or not (event.data or "").strip():
            return []
        if event.data.strip() == "[DONE]":
            return self._done()
        chunk = wire.event_data(event)
        if chunk is None:
            self.skipped += 1
            return []
        if chunk.get("error") or chunk.get("object") == "error":
            return [_error_event(chunk)]
        events: list[dict] = []
        choice = _first_choice(chunk)
        usage = usage_from_chat(chunk.get("usage"))
        if choice is not None:
            if not self._started:
                self._started = True
                events.append(
                    {
                        "type": "start",
                        "id": chunk.get("id"),
                        "model": chunk.get("model"),
                        "usage": None,
                    }
                )
            events.extend(self._delta(choice.get("delta") or {}))
            if choice.get("finish_reason") and not self._finished:
                self._finished = True
                stop_reason, stop_sequence = _stop_of(choice)
                events.extend(self._close())
                events.append(
                    {
                        "type": "finish",
                        "stop_reason": stop_reason,
                        "stop_sequence": stop_sequence,
                        "usage": usage,
                    }
                )
                usage = None
        if usage:
            events.append({"type": "usage", "usage": usage})
        return events

    def finish(self) -> list[dict]:
        """End of the upstream bytes: close an open block; ``stop`` if the answer was whole."""
        events = self._close()
        if self._finished and not self._stopped:
            self._stopped = True
            events.append({"type": "stop"})
        return events

    def _done(self) -> list[dict]:
        events = self._close()
        if not self._finished:
            self._finished = True
            events.append(
                {"type": "finish", "stop_reason": None, "stop_sequence": None, "usage": None}
            )
        self._stopped = True
        events.append({"type": "stop"})
        return events

    def _delta(self, delta: dict) -> list[dict]:
        events: list[dict] = []
        reasoning = _reasoning_of(delta)
        if reasoning:
            events.extend(self._ensure("reasoning"))
            events.append(
                {"type": "block_delta", "index": self._open, "delta": {"reasoning": reasoning}}
            )
        content = delta.get("content")
        if isinstance(content, str) and content:
            events.extend(self._ensure("text"))
            events.append({"type": "block_delta", "index": self._open, "delta": {"text": content}})
        for call in _calls_of(delta):
            events.extend(self._tool_delta(call))
        return events

    def _tool_delta(self, call: dict) -> list[dict]:
        events: list[dict] = []
        index = call.get("index")
        if not isinstance(index, int):  # servers that omit it send one call at a time
            same = self._tools and call.get("id") in (None, self._last_call[1])
            index = self._last_call[0] if same else len(self._tools)
        function = call.get("function") or {}
        if index not in self._tools:
            events.extend(self._close())
            self._tools[index] = self._open = self._next
            self._open_kind = "tool"
            self._next += 1
            block = {
                "type": "tool_call",
                "id": call.get("id") or wire.new_id("call_"),
                "name": function.get("name") or "",
                "arguments": "",
            }
            self._last_call = (index, block["id"])
            events.append({"type": "block_start", "index": self._open, "block": block})
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"arguments": arguments}
            events.append({"type": "block_delta", "index": self._tools[index], "delta": delta})
        return events

    def _ensure(self, kind: str) -> list[dict]:
        if self._open is not None and self._open_kind == kind:
            return []
        events = self._close()
        self._open, self._open_kind = self._next, kind
        self._next += 1
        if kind == "text":
            block = {"type": "text", "text": ""}
        else:
            block = {"type": "reasoning", "text": "", "signature": None, "redacted": None}
        events.append({"type": "block_start", "index": self._open, "block": block})
        return events

    def _close(self) -> list[dict]:
        if self._open is None:
            return []
        index, self._open, self._open_kind = self._open, None, None
        return [{"type": "block_stop", "index": index}]


def _first_choice(body: dict) -> dict | None:
    for choice in body.get("choices") or []:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None


def _reasoning_of(message: dict) -> str | None:
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _calls_of(message: dict) -> list[dict]:
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        return [c for c in calls if isinstance(c, dict)]
    legacy = message.get("function_call")
    return [{"index": 0, "function": legacy}] if isinstance(legacy, dict) else []


def _stop_of(choice: dict) -> tuple[str | None, str | None]:
    finish = choice.get("finish_reason")
    matched = choice.get("stop_reason")  # vLLM: the stop string that ended the answer
    if finish == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    if not finish:
        return None, None
    return FINISH_TO_IR.get(finish, "end_turn"), None


def _reasoning_block(text: str) -> dict:
    return {"type": "reasoning", "text": text, "signature": None, "redacted": None}


def _error_event(chunk: dict) -> dict:
    error = chunk.get("error")
    if not isinstance(error, dict):
        error = {"message": error if isinstance(error, str) else chunk.get("message")}
    return {
        "type": "error",
        "message": str(error.get("message") or "upstream error"),
        "error_type": error.get("type") or chunk.get("type"),
    }
