"""OpenAI Responses streams, both ways: upstream events to IR events, IR events to events.

Reading copes with servers that send text or arguments only in the ``.done`` events; blank
data is a keep-alive, data that is not JSON is counted in ``skipped``. ``sequence`` is the last event number
the upstream sent, so an error the gateway appends to a relayed stream numbers on from it.

Writing follows the sequence OpenAI sends and the ``openai`` SDK's ``ResponseStream``
checks (``lib/streaming/responses/_responses.py``): ``event:`` lines, a ``sequence_number``
on every event, ``response.created`` first and the same response ``id`` on every lifecycle
event, every ``output_item.added`` matched by an ``output_item.done``, content deltas only
inside their item, and a terminal ``response.completed`` (or ``response.incomplete`` /
``response.failed``) carrying the full output and usage.

One module for both directions although it passes 300 lines: it is one event vocabulary,
and the parser and the renderer are each one class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from gateway import sse
from gateway.errors import OPENAI_RESPONSES, error_body

from .. import ir, wire
from ..rendering import StreamRendererBase
from .response import (
    blocks_of,
    finished,
    item_for,
    response_object,
    stop_of,
    text_part,
    usage_from_responses,
)


class StreamParser:
    """Responses stream events -> IR stream events."""

    # Events that open a stream and carry nothing a client could use: an error after
    # only these (``error``, ``response.failed``) fails over (``Response.events``).
    PREFACE = frozenset({"response.created", "response.in_progress"})

    def __init__(self) -> None:
        self.skipped = 0
        self.sequence: int | None = None
        self._next = 0
        self._items: dict[int, dict] = {}  # output_index -> {"kind", "index", "got", "parts"}
        self._parts: dict[tuple[int, int], dict] = {}  # (output_index, content_index) -> same
        self._open: list[int] = []
        self._saw_calls = False

    def feed(self, event: sse.Event) -> list[dict]:
        """Convert one SSE event."""
        data = wire.event_data(event)
        if data is None:
            self.skipped += not wire.blank(event)
            return []
        sequence = wire.count(data.get("sequence_number"))
        if sequence is not None:
            self.sequence = sequence
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
        key = (data.get("output_index"), data.get("content_index"))
        state = self._parts.get(key)
        if state is not None:  # its deltas came first and started it (``_text``)
            return [] if state["got"] else self._add(state, "text", part.get("text"))
        state, events = self._start({"type": "text", "text": ""})
        self._parts[key] = state
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
                for block in blocks_of(item):
                    part, started = self._start({"type": "text", "text": ""})
                    events += started + self._add(part, "text", block["text"])
                    parts.append(part)
            return events + [e for part in parts for e in self._stop(part)]
        if state is None or state["kind"] == "message":
            return []
        if item.get("type") == "reasoning":
            if not state["got"]:
                events += self._add(state, "reasoning", blocks_of(item)[0]["text"])
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
        events = self._untold(response) if self._next == 0 else []
        events += [{"type": "block_stop", "index": i} for i in self._open]
        self._open.clear()
        usage = usage_from_responses(response.get("usage"))
        events.append(
            {"type": "finish", "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}
        )
        events.append({"type": "stop"})
        return events

    def _untold(self, response: dict) -> list[dict]:
        """The blocks of a terminal response's output, for a stream that said none of them
        before it (a server that sends its whole answer only with ``response.completed``)."""
        events: list[dict] = []
        for item in response.get("output") or []:
            for block in blocks_of(item) if isinstance(item, dict) else []:
                field, delta = ir.BLOCK_FIELDS[block["type"]]
                signature = block.get("signature")  # a reasoning block's: a delta, as here
                state, started = self._start({**block, field: "", "signature": None})
                events += started + self._add(state, delta, block[field])
                events += self._add(state, "signature", signature)
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


def stream_error(message: str, kind: str = "api_error", sequence_number: int = 0) -> bytes:
    """An ``error`` event, as OpenAI sends when a stream fails (the SDK yields it)."""
    code = error_body(OPENAI_RESPONSES, kind, message)["error"]["type"]
    data = {
        "type": "error",
        "code": code,
        "message": message,
        "param": None,
        "sequence_number": sequence_number,
    }
    return wire.frame(data, "error")


class StreamRenderer(StreamRendererBase):
    """IR stream events -> Responses stream events for an OpenAI Responses client."""

    def __init__(self, request: dict) -> None:
        super().__init__(request)
        self._id = wire.new_id("resp_")
        self._seq = 0
        self._output: list[dict] = []  # items in output order, updated as they grow
        self._live: dict[int, dict] = {}  # IR block index -> {"item", "output_index", "text", ...}

    def _start(self, event: dict) -> list[bytes]:
        if event["type"] == "start":
            self._id = event.get("id") or self._id
            self.model = event.get("model") or self.model
        response = self._response(status="in_progress", usage=None)
        return [
            self._emit("response.created", response=response),
            self._emit("response.in_progress", response=response),
        ]

    def _block_start(self, index: int, block: dict) -> list[bytes]:
        item = item_for(block)
        if item is None:
            return []
        live = self._live[index] = {
            "item": item,
            "output_index": len(self._output),
            "text": [],
            "block": block,
        }
        self._output.append(item)
        frames = [
            self._emit(
                "response.output_item.added", output_index=live["output_index"], item=dict(item)
            )
        ]
        if item["type"] == "message":
            frames.append(
                self._emit(
                    "response.content_part.added",
                    **self._at(live),
                    content_index=0,
                    part=text_part(""),
                )
            )
        return frames

    def _block_delta(self, index: int, delta: dict) -> list[bytes]:
        live = self._live.get(index)
        frames: list[bytes] = []
        if live is None:  # a delta for a block that never started
            frames = self._block_start(index, ir.block_for_delta(delta))
            live = self._live[index]
        if "signature" in delta:
            live["block"] = {
                **live["block"],
                "signature": (live["block"].get("signature") or "") + delta["signature"],
            }
            return frames
        value = next(iter(delta.values()))
        kind = live["item"]["type"]
        if kind == "reasoning" and not live["text"]:
            part = {"type": "summary_text", "text": ""}
            frames.append(
                self._emit(
                    "response.reasoning_summary_part.added",
                    **self._at(live),
                    summary_index=0,
                    part=part,
                )
            )
        live["text"].append(value)
        if kind == "message":
            frames.append(
                self._emit(
                    "response.output_text.delta",
                    **self._at(live),
                    content_index=0,
                    delta=value,
                    logprobs=[],
                )
            )
        elif kind == "reasoning":
            frames.append(
                self._emit(
                    "response.reasoning_summary_text.delta",
                    **self._at(live),
                    summary_index=0,
                    delta=value,
                )
            )
        else:
            frames.append(
                self._emit("response.function_call_arguments.delta", **self._at(live), delta=value)
            )
        return frames

    def _block_stop(self, index: int) -> list[bytes]:
        live = self._live.pop(index, None)
        if live is None:
            return []
        text = "".join(live["text"])
        kind = live["item"]["type"]
        at = self._at(live)
        frames = []
        if kind == "message":
            frames.append(
                self._emit(
                    "response.output_text.done", **at, content_index=0, text=text, logprobs=[]
                )
            )
            frames.append(
                self._emit(
                    "response.content_part.done", **at, content_index=0, part=text_part(text)
                )
            )
        elif kind == "reasoning" and text:
            part = {"type": "summary_text", "text": text}
            frames.append(
                self._emit("response.reasoning_summary_text.done", **at, summary_index=0, text=text)
            )
            frames.append(
                self._emit("response.reasoning_summary_part.done", **at, summary_index=0, part=part)
            )
        elif kind == "function_call":
            frames.append(self._emit("response.function_call_arguments.done", **at, arguments=text))
        item = finished(live["item"], {**live["block"], "text": text, "arguments": text})
        self._output[live["output_index"]] = item
        frames.append(
            self._emit("response.output_item.done", output_index=live["output_index"], item=item)
        )
        return frames

    def _end(self) -> list[bytes]:
        frames = [frame for index in list(self._live) for frame in self._block_stop(index)]
        stop_reason = (self.finish_event or {}).get("stop_reason")
        response = self._response(stop_reason=stop_reason, usage=self.usage)
        incomplete = response["status"] == "incomplete"
        terminal = "response.incomplete" if incomplete else "response.completed"
        return [*frames, self._emit(terminal, response=response)]

    def _error(self, message: str, kind: str) -> list[bytes]:
        # The SDK wants response.created first and the same id on response.failed.
        frames = [] if self.started else self._begin({"type": "start"})
        frames.append(stream_error(message, kind, self._seq))
        self._seq += 1
        error = {"code": "server_error", "message": message}
        response = self._response(status="failed", usage=self.usage, error=error)
        return [*frames, self._emit("response.failed", response=response)]

    def _response(self, **fields: Any) -> dict:
        return response_object(
            self._id, self.model, self.request, output=list(self._output), **fields
        )

    def _at(self, live: dict) -> dict:
        return {"item_id": live["item"]["id"], "output_index": live["output_index"]}

    def _emit(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return wire.frame(data, kind)
