"""The internal representation (IR) every wire protocol converts to and from.

Pure data: plain dicts and lists that survive ``json.dumps``. Each protocol module in
this package turns its own wire format into the IR and back; nothing else in the
gateway needs to know a wire format.

Request::

    {"model": str, "system": [Block] | [], "messages": [Message],
     "tools": [Tool] | [], "tool_choice": ToolChoice | None,
     "max_tokens": int | None, "temperature": float | None, "top_p": float | None,
     "top_k": int | None, "stop": [str] | None, "stream": bool,
     "stream_usage": bool,            # the client asked for usage in its stream
     "reasoning": {"effort": str | None, "budget_tokens": int | None,
                   "summary": str | None} | None,
     "parallel_tool_calls": bool | None,
     "extra": {str: Any}}             # client fields with no mapping, forwarded as-is

    Message    = {"role": "user" | "assistant", "content": [Block]}
    Tool       = {"name": str, "description": str | None, "parameters": dict | None}
    ToolChoice = {"type": "auto" | "none" | "required"} | {"type": "tool", "name": str}

Blocks (message content, system, tool results, response content)::

    {"type": "text", "text": str}
    {"type": "image", "source": {"type": "base64", "media_type": str, "data": str}
                              | {"type": "url", "url": str}, "detail": str | None}
    {"type": "reasoning", "text": str, "signature": str | None,
     "redacted": str | None}          # Anthropic redacted_thinking data
    {"type": "tool_call", "id": str, "name": str, "arguments": str}   # JSON text
    {"type": "tool_result", "tool_call_id": str, "content": [Block], "is_error": bool}

Tool results travel inside ``user`` messages (as Anthropic does); adapters for
protocols with a ``tool`` role or ``function_call_output`` items split them out.

Optional keys that some blocks carry: ``cache_control`` (on blocks and tools, so an
Anthropic-to-Anthropic call keeps prompt caching), ``strict`` (on tools), and ``id``
(on reasoning blocks: a Responses reasoning item's id, needed to replay it).

Response::

    {"id": str, "model": str, "content": [Block], "stop_reason": StopReason | None,
     "stop_sequence": str | None, "usage": Usage}

    StopReason = "end_turn" | "max_tokens" | "stop_sequence" | "tool_use"
               | "content_filter" | "pause_turn" | "refusal"
    Usage = {"input_tokens": int | None,   # ALL prompt tokens, cached ones included
             "output_tokens": int | None,  # reasoning tokens included
             "cache_read_tokens": int | None,   # part of input_tokens
             "cache_write_tokens": int | None,  # part of input_tokens
             "cache_write_1h_tokens": int | None,  # part of cache_write_tokens:
                                                   # Anthropic's 1-hour cache writes
             "reasoning_tokens": int | None}    # part of output_tokens

``None`` means the upstream did not say: unknown is never written as 0.

Stream events (the Anthropic event model, which is the richest of the three)::

    {"type": "start", "id": str | None, "model": str | None, "usage": Usage | None}
    {"type": "block_start", "index": int, "block": Block}   # text/reasoning/tool_call,
                                                            # with empty text/arguments
    {"type": "block_delta", "index": int,
     "delta": {"text": str} | {"reasoning": str} | {"signature": str}
            | {"arguments": str}}
    {"type": "block_stop", "index": int}
    {"type": "finish", "stop_reason": StopReason | None, "stop_sequence": str | None,
     "usage": Usage | None}
    {"type": "usage", "usage": Usage}       # usage that arrives on its own (OpenAI)
    {"type": "stop"}                         # the upstream's terminal event
    {"type": "error", "message": str, "error_type": str | None}

Block indexes start at 0 and count blocks in ``block_start`` order. A ``usage``
event may come after ``finish``; ``stop`` is always last when the stream is whole.
"""

from __future__ import annotations

from typing import Any

USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
)
# The largest count a record keeps (PostgreSQL's integer column). No call comes near it:
# a count past it, or below 0, is not a count but a fault of the upstream's.
MAX_COUNT = 2**31 - 1
STOP_REASONS = frozenset(
    {
        "end_turn",
        "max_tokens",
        "stop_sequence",
        "tool_use",
        "content_filter",
        "pause_turn",
        "refusal",
    }
)


# Reasoning effort (OpenAI) <-> thinking budget in tokens (Anthropic): the IR keeps what the
# client said; a protocol that has only the other spelling converts with these.
_BUDGET_FOR_EFFORT = {"low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768, "max": 32768}
_EFFORT_FOR_BUDGET = ((2048, "low"), (8192, "medium"))  # by upper bound; above: "high"


def usage(**counts: int | None) -> dict[str, int | None]:
    """A usage dict with every field present; unknown fields are None, and so are counts
    that cannot be counts (below 0, or past ``MAX_COUNT``: a sum of counts may be)."""
    unknown = set(counts) - set(USAGE_FIELDS)
    if unknown:
        raise ValueError(f"unknown usage fields: {sorted(unknown)}")
    return {name: bounded(counts.get(name)) for name in USAGE_FIELDS}


def bounded(value: int | None) -> int | None:
    """``value`` if a record can keep it as a count (0 to ``MAX_COUNT``), else None."""
    return value if value is not None and 0 <= value <= MAX_COUNT else None


def merge_usage(old: dict | None, new: dict | None) -> dict | None:
    """Later counts win field by field; a None in ``new`` keeps what ``old`` knew."""
    if not new:
        return old
    merged = dict(old or usage())
    for name in USAGE_FIELDS:
        if new.get(name) is not None:
            merged[name] = new[name]
    return merged


def empty_response() -> dict[str, Any]:
    """A response with nothing in it yet."""
    return {
        "id": None,
        "model": None,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage(),
    }


class Accumulator:
    """Build an IR response from IR stream events, as they arrive.

    ``terminal`` turns true on ``stop``; ``error`` holds an upstream error event.
    Deltas for an index that never started (a sloppy upstream) start a block.
    Text arrives in many small deltas, so parts are kept in lists and joined once,
    by ``result()``.
    """

    def __init__(self) -> None:
        self.terminal = False
        self.error: dict | None = None
        self.events = 0
        self._head = empty_response()
        self._blocks: list[tuple[dict, dict[str, list[str]]]] = []
        self._by_index: dict[int, dict[str, list[str]]] = {}

    def feed(self, event: dict) -> None:
        """Apply one stream event."""
        self.events += 1
        kind = event["type"]
        head = self._head
        if kind == "block_delta":
            parts = self._by_index.get(event["index"])
            if parts is None:
                parts = self._start(event["index"], block_for_delta(event["delta"]))
            for name, value in event["delta"].items():
                parts.setdefault(_DELTA_FIELD.get(name, name), []).append(value)
        elif kind == "block_start":
            self._start(event["index"], event["block"])
        elif kind == "start":
            head["id"] = event.get("id") or head["id"]
            head["model"] = event.get("model") or head["model"]
            head["usage"] = merge_usage(head["usage"], event.get("usage"))
        elif kind == "finish":
            head["stop_reason"] = event.get("stop_reason") or head["stop_reason"]
            head["stop_sequence"] = event.get("stop_sequence") or head["stop_sequence"]
            head["usage"] = merge_usage(head["usage"], event.get("usage"))
        elif kind == "usage":
            head["usage"] = merge_usage(head["usage"], event.get("usage"))
        elif kind == "stop":
            self.terminal = True
        elif kind == "error":
            self.error = {"message": event.get("message"), "type": event.get("error_type")}
        elif kind == "more":  # the content of choices past the first (``n``)
            head["more"] = event["more"]

    def result(self) -> dict[str, Any]:
        """The response as accumulated so far (complete once ``terminal``)."""
        content = []
        for block, parts in self._blocks:
            block = dict(block)
            for name, chunks in parts.items():
                block[name] = (block.get(name) or "") + "".join(chunks)
            content.append(block)
        return {**self._head, "usage": dict(self._head["usage"]), "content": content}

    def _start(self, index: int, block: dict) -> dict[str, list[str]]:
        parts: dict[str, list[str]] = {}
        self._blocks.append((dict(block), parts))
        self._by_index[index] = parts
        return parts


def stream_events(response: dict) -> list[dict]:
    """A whole IR response as the stream events that carry it (what ``Accumulator`` reads).

    For answering a stream from a stored answer (request dedup): ``start`` with the
    usage, each block as start, one delta per field, stop; ``finish``; ``stop``.
    """
    events: list[dict] = [
        {
            "type": "start",
            "id": response.get("id"),
            "model": response.get("model"),
            "usage": response.get("usage"),
        }
    ]
    index = 0
    for block in response.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            opened, deltas = {"type": "text", "text": ""}, [("text", block.get("text"))]
        elif kind == "reasoning":
            opened = {**block, "text": "", "signature": None}
            deltas = [("reasoning", block.get("text")), ("signature", block.get("signature"))]
        elif kind == "tool_call":
            opened = {**block, "arguments": ""}
            deltas = [("arguments", block.get("arguments"))]
        else:
            continue  # an answer holds text, reasoning and tool calls only
        events.append({"type": "block_start", "index": index, "block": opened})
        events += [
            {"type": "block_delta", "index": index, "delta": {name: value}}
            for name, value in deltas
            if value
        ]
        events.append({"type": "block_stop", "index": index})
        index += 1
    events.append(
        {
            "type": "finish",
            "stop_reason": response.get("stop_reason"),
            "stop_sequence": response.get("stop_sequence"),
            "usage": response.get("usage"),
        }
    )
    if response.get("more"):
        events.append({"type": "more", "more": response["more"]})
    events.append({"type": "stop"})
    return events


def budget_for_effort(effort: str | None) -> int | None:
    """The thinking budget for a reasoning effort; None for efforts that turn it off."""
    return _BUDGET_FOR_EFFORT.get(effort or "")


def effort_for_budget(budget: int | None) -> str | None:
    """The reasoning effort closest to a thinking budget."""
    if budget is None:
        return None
    return next((effort for bound, effort in _EFFORT_FOR_BUDGET if budget <= bound), "high")


# Which block field each delta key appends to.
_DELTA_FIELD = {
    "text": "text",
    "reasoning": "text",
    "signature": "signature",
    "arguments": "arguments",
}


# An answer's block type -> the field that holds its content, and the delta that adds to it.
BLOCK_FIELDS = {
    "text": ("text", "text"),
    "reasoning": ("text", "reasoning"),
    "tool_call": ("arguments", "arguments"),
}


def block_for_delta(delta: dict) -> dict:
    """An empty block of the kind a delta adds to (for a delta whose block never started)."""
    if "arguments" in delta:
        return {"type": "tool_call", "id": "", "name": "", "arguments": ""}
    if "reasoning" in delta or "signature" in delta:
        return {"type": "reasoning", "text": "", "signature": None, "redacted": None}
    return {"type": "text", "text": ""}


def text_of(blocks: list[dict]) -> str:
    """Concatenate the text blocks of a content list."""
    return "".join(b["text"] for b in blocks if b.get("type") == "text")
