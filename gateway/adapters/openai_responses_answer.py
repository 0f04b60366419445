"""OpenAI Responses answers: upstream ``response`` bodies and event streams to the IR.

Output items map to IR blocks: ``message`` parts (``output_text``, ``refusal``) to text,
``reasoning`` items to reasoning blocks (summary text, or ``reasoning_text`` content for
open models; ``encrypted_content`` as the signature; the item ``id`` kept), and
``function_call`` items to tool calls (``call_id`` is the IR id). ``status`` gives the
stop reason: ``completed`` is ``tool_use`` when the output has function calls,
``incomplete`` is ``max_tokens`` (or ``content_filter``). The stream parser also copes
with servers that send text or arguments only in the ``.done`` events. Data that is not
JSON is skipped (counted in ``skipped``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from gateway import sse

from . import ir, wire


def parse_response(body: dict) -> dict:
    """Convert a Responses ``response`` body to an IR response."""
    resp = ir.empty_response()
    resp["id"], resp["model"] = body.get("id"), body.get("model")
    for item in body.get("output") or []:
        if isinstance(item, dict):
            resp["content"].extend(_blocks_of(item))
    resp["stop_reason"] = stop_of(body)
    resp["usage"] = usage_from_responses(body.get("usage"))
    return resp


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
    details = usage.get("input_tokens_details") or {}
    output_details = usage.get("output_tokens_details") or {}
    return ir.usage(
        input_tokens=wire.count(usage.get("input_tokens")),
        output_tokens=wire.count(usage.get("output_tokens")),
        cache_read_tokens=wire.count(details.get("cached_tokens")),
        cache_write_tokens=wire.count(details.get("cache_write_tokens")),
        reasoning_tokens=wire.count(output_details.get("reasoning_tokens")),
    )


class StreamParser:
    """Responses stream events -> IR stream events."""

    def __init__(self) -> None:
        self.skipped = 0
        self._next = 0
        self._items: dict[int, dict] = {}  # output_index -> {"kind", "index", "got", "parts"}
        self._parts: dict[tuple[int, int], dict] = {}  # (output_index, content_index) -> same
        self._open: list[int] = []
        self._saw_calls = False

    def feed(self, event: sse.Event) -> list[dict]:
        """Convert one SSE event."""
        data = wire.event_data(event)
        if data is None:
            self.skipped += event.data is not None
            return []
        handler = self._HANDLERS.get(data.get("type") or event.event)
        return handler(self, data) if handler else []

    def finish(self) -> list[dict]:
        """End of the upstream bytes; the terminal event is ``response.completed``."""
        return []

    def _on_created(self, data: dict) -> list[dict]:
        response = data.get("response") or {}
        return [
            {
                "type": "start",
                "id": response.get("id"),
                "model": response.get("model"),
                "usage": None,
            }
        ]

    def _on_output_item_added(self, data: dict) -> list[dict]:
        item, output_index = data.get("item") or {}, data.get("output_index")
        kind = item.get("type")
        if kind == "message":
            self._items[output_index] = {"kind": "message"}
            return []
        if kind == "reasoning":
            block = {
                "type": "reasoning",
                "text": "",
                "signature": None,
                "redacted": None,
                "id": item.get("id"),
            }
        elif kind == "function_call":
            self._saw_calls = True
            call_id = item.get("call_id") or item.get("id") or ""
            block = {
                "type": "tool_call",
                "id": call_id,
                "name": item.get("name") or "",
                "arguments": "",
            }
        else:
            return []  # hosted tool calls have no IR block
        state, events = self._start(block)
        self._items[output_index] = state
        if kind == "function_call" and item.get("arguments"):
            events.extend(self._add(state, "arguments", item["arguments"]))
        return events

    def _on_content_part_added(self, data: dict) -> list[dict]:
        part = data.get("part") or {}
        if part.get("type") not in ("output_text", "refusal"):
            return []
        state, events = self._start({"type": "text", "text": ""})
        self._parts[(data.get("output_index"), data.get("content_index"))] = state
        return events + self._add(state, "text", part.get("text") or part.get("refusal") or "")

    def _on_text_delta(self, data: dict) -> list[dict]:
        return self._text(data, data.get("delta"))

    def _on_text_done(self, data: dict) -> list[dict]:
        return self._text(data, data.get("text") or data.get("refusal"), done=True)

    def _on_content_part_done(self, data: dict) -> list[dict]:
        state = self._parts.get((data.get("output_index"), data.get("content_index")))
        return self._stop(state)

    def _on_summary_part_added(self, data: dict) -> list[dict]:
        state, events = self._reasoning(data)
        # Summary parts are paragraphs of one reasoning block.
        return events + (self._add(state, "reasoning", "\n\n") if state["got"] else [])

    def _on_reasoning_delta(self, data: dict) -> list[dict]:
        state, events = self._reasoning(data)
        return events + self._add(state, "reasoning", data.get("delta"))

    def _on_reasoning_done(self, data: dict) -> list[dict]:
        state, events = self._reasoning(data)
        return events + ([] if state["got"] else self._add(state, "reasoning", data.get("text")))

    def _on_function_call_arguments_delta(self, data: dict) -> list[dict]:
        state = self._items.get(data.get("output_index"))
        return self._add(state, "arguments", data.get("delta")) if state else []

    def _on_function_call_arguments_done(self, data: dict) -> list[dict]:
        state = self._items.get(data.get("output_index"))
        return (
            self._add(state, "arguments", data.get("arguments"))
            if state and not state["got"]
            else []
        )

    def _on_output_item_done(self, data: dict) -> list[dict]:
        item, output_index = data.get("item") or {}, data.get("output_index")
        state = self._items.get(output_index)
        events: list[dict] = []
        if item.get("type") == "message":
            parts = [s for key, s in self._parts.items() if key[0] == output_index]
            if not parts:  # a server that sends the text only here
                for block in _blocks_of(item):
                    part, started = self._start({"type": "text", "text": ""})
                    events += started + self._add(part, "text", block["text"])
                    parts.append(part)
            return events + [e for part in parts for e in self._stop(part)]
        if state is None or state["kind"] == "message":
            return []
        if item.get("type") == "reasoning":
            if not state["got"]:
                events += self._add(state, "reasoning", _blocks_of(item)[0]["text"])
            if item.get("encrypted_content"):
                events += self._add(state, "signature", item["encrypted_content"])
        elif item.get("type") == "function_call" and not state["got"]:
            events += self._add(state, "arguments", item.get("arguments"))
        return events + self._stop(state)

    def _on_completed(self, data: dict) -> list[dict]:
        response = data.get("response") or {}
        return self._end(stop_of(response, self._saw_calls), response)

    def _on_incomplete(self, data: dict) -> list[dict]:
        response = data.get("response") or {}
        return self._end(stop_of({**response, "status": "incomplete"}), response)

    def _on_failed(self, data: dict) -> list[dict]:
        error = (data.get("response") or {}).get("error") or {}
        return [
            {
                "type": "error",
                "message": error.get("message") or "response failed",
                "error_type": error.get("code"),
            }
        ]

    def _on_error(self, data: dict) -> list[dict]:
        error = data.get("error") if isinstance(data.get("error"), dict) else data
        return [
            {
                "type": "error",
                "message": error.get("message") or "upstream error",
                "error_type": error.get("code"),
            }
        ]

    def _end(self, stop_reason: str | None, response: dict) -> list[dict]:
        events = [{"type": "block_stop", "index": i} for i in self._open]
        self._open.clear()
        usage = usage_from_responses(response.get("usage"))
        events.append(
            {"type": "finish", "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}
        )
        events.append({"type": "stop"})
        return events

    def _text(self, data: dict, text: Any, done: bool = False) -> list[dict]:
        key = (data.get("output_index"), data.get("content_index"))
        state = self._parts.get(key)
        events: list[dict] = []
        if state is None:  # a delta before (or without) its content_part.added
            state, events = self._start({"type": "text", "text": ""})
            self._parts[key] = state
        if done and state["got"]:
            return events
        return events + self._add(state, "text", text)

    def _reasoning(self, data: dict) -> tuple[dict, list[dict]]:
        state = self._items.get(data.get("output_index"))
        if state is not None and state["kind"] == "reasoning":
            return state, []
        # Reasoning text for an item that was never announced.
        block = {
            "type": "reasoning",
            "text": "",
            "signature": None,
            "redacted": None,
            "id": data.get("item_id"),
        }
        state, events = self._start(block)
        self._items[data.get("output_index")] = state
        return state, events

    def _start(self, block: dict) -> tuple[dict, list[dict]]:
        index, self._next = self._next, self._next + 1
        self._open.append(index)
        kind = {"text": "text", "reasoning": "reasoning", "tool_call": "tool"}[block["type"]]
        return {"kind": kind, "index": index, "got": False}, [
            {"type": "block_start", "index": index, "block": block}
        ]

    def _add(self, state: dict, field: str, value: Any) -> list[dict]:
        if not isinstance(value, str) or not value:
            return []
        state["got"] = state["got"] or field != "signature"
        return [{"type": "block_delta", "index": state["index"], "delta": {field: value}}]

    def _stop(self, state: dict | None) -> list[dict]:
        if state is None or state["index"] not in self._open:
            return []
        self._open.remove(state["index"])
        return [{"type": "block_stop", "index": state["index"]}]

    _HANDLERS: ClassVar[dict[str, Callable[[StreamParser, dict], list[dict]]]] = {
        "response.created": _on_created,
        "response.output_item.added": _on_output_item_added,
        "response.content_part.added": _on_content_part_added,
        "response.output_text.delta": _on_text_delta,
        "response.refusal.delta": _on_text_delta,
        "response.output_text.done": _on_text_done,
        "response.refusal.done": _on_text_done,
        "response.content_part.done": _on_content_part_done,
        "response.reasoning_summary_part.added": _on_summary_part_added,
        "response.reasoning_summary_text.delta": _on_reasoning_delta,
        "response.reasoning_text.delta": _on_reasoning_delta,
        "response.reasoning_summary_text.done": _on_reasoning_done,
        "response.reasoning_text.done": _on_reasoning_done,
        "response.function_call_arguments.delta": _on_function_call_arguments_delta,
        "response.function_call_arguments.done": _on_function_call_arguments_done,
        "response.output_item.done": _on_output_item_done,
        "response.completed": _on_completed,
        "response.incomplete": _on_incomplete,
        "response.failed": _on_failed,
        "error": _on_error,
    }


def _blocks_of(item: dict) -> list[dict]:
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
                "arguments": item.get("arguments") or "",
            }
        ]
    return []
