"""The IR rendered for OpenAI Responses clients: ``response`` bodies and event streams.

Streams follow the sequence OpenAI sends and the ``openai`` SDK's ``ResponseStream``
checks (``lib/streaming/responses/_responses.py``): ``event:`` lines, a ``sequence_number``
on every event, ``response.created`` first and the same response ``id`` on every lifecycle
event, every ``output_item.added`` matched by an ``output_item.done``, content deltas only
inside their item, and a terminal ``response.completed`` (or ``response.incomplete`` /
``response.failed``) carrying the full output and usage. Reasoning is rendered as a
reasoning summary, which is what Responses clients display.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.errors import OPENAI_RESPONSES, error_body

from . import ir, wire
from .rendering import StreamRendererBase

# IR stop reasons that end a response as incomplete, and the reason Responses gives.
_INCOMPLETE = {"max_tokens": "max_output_tokens", "content_filter": "content_filter"}


def render_response(resp: dict, request: dict) -> dict:
    """Render an IR response as the ``response`` body the openai SDK parses."""
    output = []
    for block in resp.get("content") or []:
        item = _item_for(block)
        if item is not None:
            output.append(_finished(item, block))
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
        item = _item_for(block)
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
                    part=_text_part(""),
                )
            )
        return frames

    def _block_delta(self, index: int, delta: dict) -> list[bytes]:
        live = self._live.get(index)
        frames: list[bytes] = []
        if live is None:  # a delta for a block that never started
            frames = self._block_start(index, ir._block_for_delta(delta))
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
                    "response.content_part.done", **at, content_index=0, part=_text_part(text)
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
        item = _finished(live["item"], {**live["block"], "text": text, "arguments": text})
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


def _item_for(block: dict) -> dict | None:
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


def _finished(item: dict, block: dict) -> dict:
    """The completed form of an output item, filled from its whole IR block."""
    item = dict(item)
    if item["type"] == "message":
        item.update(status="completed", content=[_text_part(block.get("text") or "")])
    elif item["type"] == "reasoning":
        text = block.get("text") or ""
        item["summary"] = [{"type": "summary_text", "text": text}] if text else []
        if block.get("signature"):
            item["encrypted_content"] = block["signature"]
    else:
        item.update(status="completed", arguments=block.get("arguments") or "")
    return item


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}
