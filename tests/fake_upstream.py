"""A fake LLM provider for tests and benchmarks: a standalone gevent WSGI server.

Speaks OpenAI Chat Completions (also at Azure's deployment paths), OpenAI Responses,
Anthropic Messages, embeddings and model lists, streaming and not, with its own
renderers (never the gateway's, so a bug cannot cancel itself out).

Each call is scripted by its model name: ``name;key=value;...`` e.g.
``fake;chunks=10;delay=0.05;stall_at=3;stall_for=2``, and by an ``X-Fake-Script:
key=value;...`` request header whose keys win (so one model can serve calls scripted
apart; the gateway forwards client headers). Keys:

  id=S          names the call in the log (default: a counter)
  chunks=N      text pieces in the answer (default 5), "tok0 tok1 ..."
  pad=N         N dots in each text piece ("tok0... tok1... "): big answers
  delay=F       seconds between pieces; first_delay=F before the first one
  header_delay=F  seconds before the status line (a stall before any byte)
  stall_at=K;stall_for=F  go silent for F seconds before stream event K
  end_delay=F   seconds of silence before the last stream event (the terminal one)
  linger=F      seconds of silence after the last stream event, before the body ends
  drop_at=K     break the connection after K stream events (no terminal event)
  status=N      answer with HTTP status N and an error body
  fail_times=N  answer status (default 500) to the first N calls with this id
  reasoning=N   N reasoning pieces first;  tools=N  N tool calls after the text
  finish=length the answer was cut at its token limit (length, max_tokens, incomplete)
  finish=stop_sequence  it stopped at the stop sequence "###" (Anthropic's stop_reason,
                vLLM's ``stop_reason`` beside finish_reason "stop"; Responses cannot say)
  usage=0       embeddings: answer without usage
  dims=N        embeddings: vectors of N numbers (default 4; the request's
                ``dimensions`` wins; past 3,072 a 400, as OpenAI answers)
  unstorable=1  every text and reasoning piece carries a lone surrogate and a NUL
                (escaped, as JSON allows: ``"tok0\\ud800\\u0000 "``)
  garbage=1     a 200 with a body that is not JSON (or not SSE)
  error_event=1 a stream that ends in an error event instead of its terminal event
  error_first=1 a stream whose first and only event is that error event
  error_after=K a stream of its first K events, then that error event (Anthropic's
                ``message_start``, ``ping``, error: an overloaded model after its start)
  ping_first=1  an Anthropic stream opens with a ``ping`` before ``message_start``
  reset_before_headers=1  read the request, then reset the connection (RST): no answer
  reset_at=K    reset the connection (RST) before stream event K; a JSON answer: after
                its headers and its first K bytes
  truncate_at=K only the first K stream events (negative: all but the last -K), then a
                clean end of the body without the terminal event; a JSON answer: its
                first K bytes (Content-Length says K)
  body_stall=F  a JSON answer: its headers and the first half of its body, then F
                seconds of silence before the rest
  bad_json_at=K stream event K carries data that is not JSON (the event cut in half)
  endless_at=K  stream event K never ends: ``data: `` and then 64 KB pieces of ``x``
                with no newline, until the reader hangs up
  content_type=T  a 200 with Content-Type T: ``text/html`` an HTML page,
                ``application/json`` the JSON answer (even to a stream request),
                ``text/event-stream`` the event stream (even to a JSON request), any
                other type the usual body
  gzip=1        a stream gzip-encoded all the same (Content-Encoding: gzip, each event
                flushed as it is written), as a server may answer despite the gateway's
                ``Accept-Encoding: identity``
  heal_after=N  the first N calls with this id get the knobs of a fault (status,
                fail_times, delays, stalls, drops, resets, garbage, truncation, content
                type...); later ones answer normally, as a failover's next try expects

Like Anthropic's API, its Messages endpoint refuses top-level fields that API does not
know (400 ``invalid_request_error``: "seed: Extra inputs are not permitted").

Usage it reports: input tokens = words in the prompt's text + 3 (cached ones
included), output tokens = pieces (text + reasoning + tool argument pieces), reasoning
tokens = reasoning pieces; the usage shape is each protocol's own. Knobs for the account:

  cache=N       N prompt tokens read from the cache (OpenAI ``cached_tokens``,
                Anthropic ``cache_read_input_tokens``, Responses ``cached_tokens``)
  cache_write=N N prompt tokens written to it (Anthropic ``cache_creation_input_tokens``;
                ``cache_write_tokens`` in OpenAI's and Responses' details, as some
                compatible servers say it)
  cache_1h=N    of those, N written for an hour (Anthropic ``cache_creation``)
  usage_style=deepseek  OpenAI usage as DeepSeek sends it: ``prompt_cache_hit_tokens``
                and ``prompt_cache_miss_tokens``, no ``prompt_tokens_details``
  response_id=S the answer's id (default ``chatcmpl-fake``, ``msg_fake``, ``resp_fake``)
  response_model=S  the model the answer names (default: the request's)
  input_tokens=N, output_tokens=N  the counts reported instead (any integer: a faulty
                upstream's too)
  request_id=S  the request-id header's value (default ``req_fake_<n>``); the header is
                ``x-request-id`` (OpenAI, Responses), ``request-id`` (Anthropic),
                ``apim-request-id`` (Azure deployment paths)

``POST .../messages/count_tokens`` answers ``{"input_tokens": words + 3}``. ``GET /_log`` returns every call (``?id=S``: only those with that id): path,
body, headers, usage it reported, and ``outcome``: ``complete`` when its whole response
was written, ``client_gone`` when the gateway hung up first, ``dropped`` for drop_at,
``reset`` for the reset knobs; a stream's ``terminal_at``: ``time.monotonic()`` (one
clock for every process of the machine) just before its last event was written, and
``text_at``: that clock just before each event carrying one of its text pieces was.
``POST /_reset`` clears the log. Run: ``python tests/fake_upstream.py [--port N]``;
it prints ``PORT <n>`` once it listens.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from collections import defaultdict  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402

LOG: list[dict] = []
_COUNTER = itertools.count(1)
_FAILURES: dict[str, int] = defaultdict(int)
_CALLS: dict[str, int] = defaultdict(int)  # calls per id, for heal_after
# The knobs that make a call fail or misbehave (heal_after drops them).
FAULTS = frozenset(
    {
        "status", "fail_times", "header_delay", "first_delay", "stall_at", "stall_for",
        "drop_at", "garbage", "error_event", "error_first", "error_after", "ping_first",
        "reset_before_headers", "reset_at", "truncate_at", "body_stall", "bad_json_at",
        "endless_at", "content_type",
    }
)  # fmt: skip
ENDLESS = b"x" * 65536
HTML_PAGE = b"<!doctype html><html><head><title>Sign in</title></head><body>Sign in</body></html>"


class Dropped(Exception):
    """Raised inside a body generator: pywsgi then cuts the connection mid-body."""


class Reset(Dropped):
    """Like Dropped, but the connection ends with a TCP reset (RST), not a FIN; raised
    before the status line, nothing at all is answered."""


def parse_script(model: str) -> tuple[str, dict[str, str]]:
    name, *pairs = model.split(";")
    script = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    return name, script


def prompt_words(body: dict) -> int:
    """Words in every text of the request: the fake's own 'tokenizer'."""
    texts: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, str):
            texts.append(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for key in ("text", "content", "input", "instructions", "system", "output"):
                if key in node:
                    walk(node[key])

    for key in ("messages", "input", "system", "instructions"):
        if key in body:
            walk(body[key])
    return sum(len(t.split()) for t in texts)


class Plan:
    """What one call will answer."""

    def __init__(self, body: dict, script: dict[str, str]) -> None:
        self.script = script
        self.chunks = int(script.get("chunks", 5))
        self.reasoning = int(script.get("reasoning", 0))
        self.tools = int(script.get("tools", 0))
        self.delay = float(script.get("delay", 0))
        self.first_delay = float(script.get("first_delay", 0))
        self.stall_at = int(script.get("stall_at", -1))
        self.stall_for = float(script.get("stall_for", 0))
        self.end_delay = float(script.get("end_delay", 0))
        self.linger = float(script.get("linger", 0))
        self.drop_at = int(script.get("drop_at", -1))
        self.reset_at = int(script.get("reset_at", -1))
        self.endless_at = int(script.get("endless_at", -1))
        self.cache = int(script.get("cache", 0))
        self.cache_write = int(script.get("cache_write", 0))
        self.cache_1h = int(script.get("cache_1h", 0))
        self.deepseek = script.get("usage_style") == "deepseek"
        self.response_id = script.get("response_id")
        self.cut = script.get("finish") == "length"
        self.stop_sequence = "###" if script.get("finish") == "stop_sequence" else None
        self.input_tokens = int(script.get("input_tokens", prompt_words(body) + 3))
        pad = "." * int(script.get("pad", 0))
        odd = "\ud800\x00" if script.get("unstorable") else ""
        self.text_pieces = [f"tok{i}{odd}{pad} " for i in range(self.chunks)]
        self.reasoning_pieces = [f"think{i}{odd} " for i in range(self.reasoning)]
        # Each tool call's arguments arrive in two pieces.
        self.tool_calls = [
            {"id": f"call_{i}", "name": f"tool_{i}", "pieces": ['{"n": ', f"{i}}}"]}
            for i in range(self.tools)
        ]
        self.output_tokens = int(
            script.get("output_tokens", self.chunks + self.reasoning + 2 * self.tools)
        )

    @property
    def text(self) -> str:
        return "".join(self.text_pieces)

    @property
    def chat_finish(self) -> str:
        return "length" if self.cut else "tool_calls" if self.tools else "stop"

    @property
    def anthropic_stop(self) -> str:
        if self.stop_sequence:
            return "stop_sequence"
        return "max_tokens" if self.cut else "tool_use" if self.tools else "end_turn"

    def chat_choice(self, **choice: object) -> dict:
        """A choice that ends the answer: finish_reason, and vLLM's matched stop string."""
        choice["finish_reason"] = self.chat_finish
        if self.stop_sequence:
            choice["stop_reason"] = self.stop_sequence
        return choice

    def pace(self, index: int) -> None:
        """Sleep before piece ``index``; drop the connection if told to."""
        if index == self.drop_at:
            raise Dropped
        if index == 0 and self.first_delay:
            gevent.sleep(self.first_delay)
        elif index and self.delay:
            gevent.sleep(self.delay)
        if index == self.stall_at:
            gevent.sleep(self.stall_for)

    def usage_openai(self) -> dict:
        usage = {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cache},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning},
        }
        if self.cache_write:
            usage["prompt_tokens_details"]["cache_write_tokens"] = self.cache_write
        if self.deepseek:
            del usage["prompt_tokens_details"]
            usage["prompt_cache_hit_tokens"] = self.cache
            usage["prompt_cache_miss_tokens"] = self.input_tokens - self.cache
        return usage

    def id(self, default: str) -> str:
        return self.response_id or default

    def model(self, body: dict) -> str:
        return self.script.get("response_model", body["model"])


# -- OpenAI Chat Completions ---------------------------------------------------


def chat_stream(plan: Plan, body: dict) -> list:
    base = {
        "id": plan.id("chatcmpl-fake"),
        "object": "chat.completion.chunk",
        "created": 1,
        "model": plan.model(body),
    }
    with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict, finish: dict | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": None, **(finish or {})}
        data = {**base, "choices": [choice]}
        if with_usage:
            data["usage"] = None
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    events: list = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"reasoning_content": piece}) for piece in plan.reasoning_pieces]
    events += [chunk({"content": piece}) for piece in plan.text_pieces]
    for i, call in enumerate(plan.tool_calls):
        first = {
            "index": i,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["name"], "arguments": ""},
        }
        events.append(chunk({"tool_calls": [first]}))
        events += [
            chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]})
            for p in call["pieces"]
        ]
    if plan.script.get("error_event"):
        events.append(
            b'data: {"error": {"message": "fake upstream failure", "type": "server_error"}}\n\n'
        )
        return events
    # As OpenAI does, the usage chunk and [DONE] follow the finish chunk at once.
    tail = b"data: [DONE]\n\n"
    if with_usage:
        usage = {**base, "choices": [], "usage": plan.usage_openai()}
        tail = b"data: " + json.dumps(usage).encode() + b"\n\n" + tail
    events.append(chunk({}, plan.chat_choice()) + tail)
    return events


def chat_answer(plan: Plan, body: dict) -> dict:
    message: dict = {"role": "assistant", "content": plan.text}
    if plan.reasoning:
        message["reasoning_content"] = "".join(plan.reasoning_pieces)
    if plan.tools:
        message["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": "".join(c["pieces"])},
            }
            for c in plan.tool_calls
        ]
    return {
        "id": plan.id("chatcmpl-fake"),
        "object": "chat.completion",
        "created": 1,
        "model": plan.model(body),
        "choices": [plan.chat_choice(index=0, message=message)],
        "usage": plan.usage_openai(),
    }


# -- Anthropic Messages ----------------------------------------------------------


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def anthropic_usage(plan: Plan) -> dict:
    usage = {
        "input_tokens": plan.input_tokens - plan.cache - plan.cache_write,
        "cache_read_input_tokens": plan.cache,
        "cache_creation_input_tokens": plan.cache_write,
        "output_tokens": plan.output_tokens,
    }
    if plan.cache_1h:
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": plan.cache_write - plan.cache_1h,
            "ephemeral_1h_input_tokens": plan.cache_1h,
        }
    return usage


def anthropic_stream(plan: Plan, body: dict) -> list:
    start_usage = {**anthropic_usage(plan), "output_tokens": 1}
    message = {
        "id": plan.id("msg_fake"),
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": plan.model(body),
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    events: list = [
        _sse("message_start", {"type": "message_start", "message": message}),
        _sse("ping", {"type": "ping"}),
    ]
    index = 0

    def block(content: dict, deltas: list[dict]) -> None:
        nonlocal index
        events.append(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": content},
            )
        )
        events.extend(
            _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
            for d in deltas
        )
        events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1

    if plan.reasoning:
        deltas = [{"type": "thinking_delta", "thinking": p} for p in plan.reasoning_pieces]
        block(
            {"type": "thinking", "thinking": "", "signature": ""},
            [*deltas, {"type": "signature_delta", "signature": "sig-fake"}],
        )
    block(
        {"type": "text", "text": ""}, [{"type": "text_delta", "text": p} for p in plan.text_pieces]
    )
    for call in plan.tool_calls:
        block(
            {"type": "tool_use", "id": call["id"], "name": call["name"], "input": {}},
            [{"type": "input_json_delta", "partial_json": p} for p in call["pieces"]],
        )
    if plan.script.get("error_event"):
        events.append(
            _sse(
                "error",
                {
                    "type": "error",
                    "error": {"type": "overloaded_error", "message": "fake upstream failure"},
                },
            )
        )
        return events
    events.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": plan.anthropic_stop,
                    "stop_sequence": plan.stop_sequence,
                },
                "usage": {"output_tokens": plan.output_tokens},
            },
        )
        # message_delta and message_stop arrive together, as Anthropic sends them.
        + _sse("message_stop", {"type": "message_stop"})
    )
    return events


def anthropic_answer(plan: Plan, body: dict) -> dict:
    content: list[dict] = []
    if plan.reasoning:
        content.append(
            {
                "type": "thinking",
                "thinking": "".join(plan.reasoning_pieces),
                "signature": "sig-fake",
            }
        )
    content.append({"type": "text", "text": plan.text})
    content += [
        {
            "type": "tool_use",
            "id": c["id"],
            "name": c["name"],
            "input": json.loads("".join(c["pieces"])),
        }
        for c in plan.tool_calls
    ]
    return {
        "id": plan.id("msg_fake"),
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": plan.model(body),
        "stop_reason": plan.anthropic_stop,
        "stop_sequence": plan.stop_sequence,
        "usage": anthropic_usage(plan),
    }


# -- OpenAI Responses ------------------------------------------------------------


def responses_output(plan: Plan) -> list[dict]:
    output: list[dict] = []
    if plan.reasoning:
        output.append(
            {
                "type": "reasoning",
                "id": "rs_fake",
                "summary": [{"type": "summary_text", "text": "".join(plan.reasoning_pieces)}],
            }
        )
    output.append(
        {
            "type": "message",
            "id": "msg_fake",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": plan.text, "annotations": []}],
        }
    )
    output += [
        {
            "type": "function_call",
            "id": f"fc_{c['id']}",
            "call_id": c["id"],
            "name": c["name"],
            "arguments": "".join(c["pieces"]),
            "status": "completed",
        }
        for c in plan.tool_calls
    ]
    return output


def responses_usage(plan: Plan) -> dict:
    return {
        "input_tokens": plan.input_tokens,
        "input_tokens_details": {"cached_tokens": plan.cache}
        | ({"cache_write_tokens": plan.cache_write} if plan.cache_write else {}),
        "output_tokens": plan.output_tokens,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning},
        "total_tokens": plan.input_tokens + plan.output_tokens,
    }


def responses_answer(plan: Plan, body: dict, done: bool = True) -> dict:
    status = ("incomplete" if plan.cut else "completed") if done else "in_progress"
    return {
        "id": plan.id("resp_fake"),
        "object": "response",
        "created_at": 1,
        "status": status,
        "incomplete_details": {"reason": "max_output_tokens"} if plan.cut and done else None,
        "model": plan.model(body),
        "output": responses_output(plan) if done else [],
        "usage": responses_usage(plan) if done else None,
    }


def responses_stream(plan: Plan, body: dict) -> list:
    seq = itertools.count()
    events: list = []

    def emit(kind: str, **data: object) -> None:
        events.append(_sse(kind, {"type": kind, "sequence_number": next(seq), **data}))

    emit("response.created", response=responses_answer(plan, body, done=False))
    emit("response.in_progress", response=responses_answer(plan, body, done=False))
    index = 0
    if plan.reasoning:
        item = {"type": "reasoning", "id": "rs_fake", "summary": []}
        emit("response.output_item.added", output_index=index, item=item)
        emit(
            "response.reasoning_summary_part.added",
            item_id="rs_fake",
            output_index=index,
            summary_index=0,
            part={"type": "summary_text", "text": ""},
        )
        for piece in plan.reasoning_pieces:
            emit(
                "response.reasoning_summary_text.delta",
                item_id="rs_fake",
                output_index=index,
                summary_index=0,
                delta=piece,
            )
        text = "".join(plan.reasoning_pieces)
        emit(
            "response.reasoning_summary_text.done",
            item_id="rs_fake",
            output_index=index,
            summary_index=0,
            text=text,
        )
        emit(
            "response.output_item.done",
            output_index=index,
            item={**item, "summary": [{"type": "summary_text", "text": text}]},
        )
        index += 1
    message = {
        "type": "message",
        "id": "msg_fake",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    emit("response.output_item.added", output_index=index, item=message)
    emit(
        "response.content_part.added",
        item_id="msg_fake",
        output_index=index,
        content_index=0,
        part={"type": "output_text", "text": "", "annotations": []},
    )
    for piece in plan.text_pieces:
        emit(
            "response.output_text.delta",
            item_id="msg_fake",
            output_index=index,
            content_index=0,
            delta=piece,
        )
    emit(
        "response.output_text.done",
        item_id="msg_fake",
        output_index=index,
        content_index=0,
        text=plan.text,
    )
    part = {"type": "output_text", "text": plan.text, "annotations": []}
    emit(
        "response.content_part.done",
        item_id="msg_fake",
        output_index=index,
        content_index=0,
        part=part,
    )
    emit(
        "response.output_item.done",
        output_index=index,
        item={**message, "status": "completed", "content": [part]},
    )
    for call in plan.tool_calls:
        index += 1
        item = {
            "type": "function_call",
            "id": f"fc_{call['id']}",
            "call_id": call["id"],
            "name": call["name"],
            "arguments": "",
            "status": "in_progress",
        }
        emit("response.output_item.added", output_index=index, item=item)
        for piece in call["pieces"]:
            emit(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=piece,
            )
        args = "".join(call["pieces"])
        emit(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=index,
            arguments=args,
        )
        emit(
            "response.output_item.done",
            output_index=index,
            item={**item, "arguments": args, "status": "completed"},
        )
    if plan.script.get("error_event"):
        emit("error", code="server_error", message="fake upstream failure", param=None)
        return events
    terminal = "response.incomplete" if plan.cut else "response.completed"
    emit(terminal, response=responses_answer(plan, body))
    return events


# -- the server ------------------------------------------------------------------

# Anthropic's Messages API refuses any other top-level field.
ANTHROPIC_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature",
        "top_p", "top_k", "tools", "tool_choice", "thinking", "metadata", "service_tier",
        "container", "mcp_servers", "context_management",
    }
)  # fmt: skip

# Anthropic's count_tokens takes these (no max_tokens, no stream).
COUNT_FIELDS = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers"}
)
DEFAULT_IDS = {"chat": "chatcmpl-fake", "anthropic": "msg_fake", "responses": "resp_fake"}


def request_id_header(path: str) -> str:
    if "/deployments/" in path:
        return "apim-request-id"  # Azure
    return "request-id" if "/messages" in path else "x-request-id"


def _with_header(start_response, name: str, value: str):  # type: ignore[no-untyped-def]
    def start(status: str, headers: list, *args):  # type: ignore[no-untyped-def]
        return start_response(status, [*headers, (name, value)], *args)

    return start


STREAMS = {"chat": chat_stream, "anthropic": anthropic_stream, "responses": responses_stream}
ANSWERS = {"chat": chat_answer, "anthropic": anthropic_answer, "responses": responses_answer}
ERRORS = {
    "chat": lambda status: {
        "error": {"message": f"fake error {status}", "type": "server_error", "code": str(status)}
    },
    "responses": lambda status: {
        "error": {"message": f"fake error {status}", "type": "server_error", "code": str(status)}
    },
    "anthropic": lambda status: {
        "type": "error",
        "error": {"type": "api_error", "message": f"fake error {status}"},
    },
}


def protocol_of(path: str) -> str | None:
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/messages/count_tokens"):
        return "count_tokens"
    if path.endswith("/messages"):
        return "anthropic"
    if path.endswith("/responses"):
        return "responses"
    if path.endswith("/embeddings"):
        return "embeddings"
    return None


def app(environ: dict, start_response) -> list[bytes]:  # type: ignore[no-untyped-def]
    path = environ["PATH_INFO"]
    method = environ["REQUEST_METHOD"]
    if path == "/_log":  # ?id=S: only that call's entries
        call_id = parse_qs(environ.get("QUERY_STRING", "")).get("id", [None])[0]
        return _json(start_response, 200, [e for e in LOG if call_id in (None, e["id"])])
    if path == "/_reset" and method == "POST":
        LOG.clear()
        _FAILURES.clear()
        _CALLS.clear()
        return _json(start_response, 200, {"ok": True})
    if method == "GET" and path.endswith("/models"):
        return _json(
            start_response,
            200,
            {
                "object": "list",
                "data": [{"id": "fake-model", "object": "model", "owned_by": "fake", "created": 1}],
            },
        )
    protocol = protocol_of(path)
    if method != "POST" or protocol is None:
        return _json(start_response, 404, {"error": {"message": f"no route {method} {path}"}})
    raw = environ["wsgi.input"].read()
    try:
        body = json.loads(raw)
    except ValueError:
        return _json(start_response, 400, {"error": {"message": "fake: body is not JSON"}})
    if "/deployments/" in path:  # Azure: the deployment names the model
        body.setdefault("model", path.split("/deployments/", 1)[1].split("/", 1)[0])
    name, script = parse_script(str(body.get("model", "")))
    script.update(parse_script(";" + environ.get("HTTP_X_FAKE_SCRIPT", ""))[1])
    script = healed(script, name)
    entry = {
        "n": next(_COUNTER),
        "id": script.get("id"),
        "path": path,
        "query": environ.get("QUERY_STRING", ""),
        "protocol": protocol,
        "body": body,
        "headers": {
            k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")
        },
        "outcome": "started",
        "started": time.time(),
    }
    LOG.append(entry)
    # Every answer carries a request id, in the header the provider type uses.
    entry["request_id"] = script.get("request_id") or f"req_fake_{entry['n']}"
    start_response = _with_header(start_response, request_id_header(path), entry["request_id"])
    if float(script.get("header_delay", 0)):
        gevent.sleep(float(script["header_delay"]))
    if script.get("reset_before_headers"):
        entry["outcome"] = "reset"
        raise Reset
    status = int(script.get("status", 0))
    fail_times = int(script.get("fail_times", 0))
    if fail_times and _FAILURES[script.get("id", name)] < fail_times:
        _FAILURES[script.get("id", name)] += 1
        status = status or 500
    if status:
        entry["outcome"] = "complete"
        return _json(start_response, status, ERRORS.get(protocol, ERRORS["chat"])(status))
    known = {"anthropic": ANTHROPIC_FIELDS, "count_tokens": COUNT_FIELDS}.get(protocol)
    unknown = sorted(set(body) - known) if known else []
    if unknown:
        entry["outcome"] = "complete"
        message = f"{unknown[0]}: Extra inputs are not permitted"
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        return _json(start_response, 400, error)
    if protocol == "embeddings":
        return embeddings(start_response, body, script, entry)
    plan = Plan(body, script)
    if protocol == "count_tokens":
        entry["outcome"] = "complete"
        return _json(start_response, 200, {"input_tokens": plan.input_tokens})
    entry["usage"] = {"input_tokens": plan.input_tokens, "output_tokens": plan.output_tokens}
    entry["response_id"] = plan.id(DEFAULT_IDS[protocol])
    if script.get("garbage"):
        entry["outcome"] = "complete"
        ctype = "text/event-stream" if body.get("stream") else "application/json"
        start_response("200 OK", [("Content-Type", ctype)])
        return [b"this is not what you asked for\n\n"]
    ctype = script.get("content_type")
    streamed = bool(body.get("stream"))
    if ctype and "html" in ctype:
        entry["outcome"] = "complete"
        start_response("200 OK", [("Content-Type", ctype)])
        return [HTML_PAGE]
    if ctype and "json" in ctype:
        streamed = False
    elif ctype and "event-stream" in ctype:
        streamed = True
    if not streamed:
        plan.pace(0)
        payload = json.dumps(ANSWERS[protocol](plan, body)).encode()
        return json_body(start_response, script, payload, ctype or "application/json", entry)
    if script.get("error_first") or "error_after" in script:
        script["error_event"] = "1"
    events = STREAMS[protocol](plan, body)
    if script.get("ping_first") and protocol == "anthropic":
        events.insert(0, _sse("ping", {"type": "ping"}))
    if script.get("error_first"):
        events = events[-1:]  # the error event alone
    elif "error_after" in script:
        events = events[: int(script["error_after"])] + events[-1:]
    if "truncate_at" in script:
        events = events[: int(script["truncate_at"])]
    if "bad_json_at" in script:
        index = int(script["bad_json_at"])
        events[index] = events[index][: len(events[index]) // 2].rstrip(b"\n") + b"\n\n"
    headers = [("Content-Type", ctype or "text/event-stream"), ("Cache-Control", "no-cache")]
    body = stream_body(plan, events, entry)
    if script.get("gzip"):
        headers.append(("Content-Encoding", "gzip"))
        body = gzipped(body)
    start_response("200 OK", headers)
    return body


def gzipped(pieces):  # type: ignore[no-untyped-def]
    """Each piece gzip-compressed and flushed as it comes."""
    packer = zlib.compressobj(wbits=31)
    try:
        for piece in pieces:
            yield packer.compress(piece) + packer.flush(zlib.Z_SYNC_FLUSH)
        yield packer.flush()
    finally:
        pieces.close()


def healed(script: dict[str, str], name: str) -> dict[str, str]:
    """The script without its fault knobs once heal_after calls with its id were made."""
    if "heal_after" not in script:
        return script
    call_id = script.get("id", name)
    _CALLS[call_id] += 1
    if _CALLS[call_id] <= int(script["heal_after"]):
        return script
    return {k: v for k, v in script.items() if k not in FAULTS}


def stream_body(plan: Plan, events: list[bytes], entry: dict):  # type: ignore[no-untyped-def]
    """Write events with the plan's pacing; log how far the reader got."""
    entry["outcome"] = "client_gone"
    sent = 0
    # Each text piece as its event carries it (JSON-quoted: a whole answer's text, in a
    # closing event, holds the pieces without their own quotes).
    quoted = [json.dumps(piece).encode() for piece in plan.text_pieces]
    entry["text_at"] = []
    try:
        for index, event in enumerate(events):
            if index == plan.reset_at:
                raise Reset
            if index == plan.endless_at:
                yield b"data: "
                while True:
                    yield ENDLESS
            plan.pace(index)
            if index == len(events) - 1:
                gevent.sleep(plan.end_delay)
                entry["terminal_at"] = time.monotonic()
            if len(entry["text_at"]) < len(quoted) and quoted[len(entry["text_at"])] in event:
                entry["text_at"].append(time.monotonic())
            yield event
            sent += 1
            entry["sent"] = sent
        if plan.linger:
            yield b""  # the last event goes out before the silence
            gevent.sleep(plan.linger)
        entry["outcome"] = "complete"
    except Dropped as exc:
        entry["outcome"] = "reset" if isinstance(exc, Reset) else "dropped"
        raise
    finally:
        entry["finished"] = time.time()


def json_body(start_response, script: dict, payload: bytes, ctype: str, entry: dict):  # type: ignore[no-untyped-def]
    """A JSON answer, cut, stalled or reset halfway as the script says."""
    if "truncate_at" in script:
        payload = payload[: int(script["truncate_at"])]
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(payload)))])
    if "reset_at" in script:
        return _json_pieces(payload, int(script["reset_at"]), None, entry)
    if "body_stall" in script:
        return _json_pieces(payload, len(payload) // 2, float(script["body_stall"]), entry)
    entry["outcome"] = "complete"
    return [payload]


def _json_pieces(payload: bytes, cut: int, stall: float | None, entry: dict):  # type: ignore[no-untyped-def]
    """The first ``cut`` bytes, then a reset (no ``stall``) or a silence and the rest."""
    entry["outcome"] = "client_gone"
    try:
        yield payload[:cut]
        if stall is None:
            entry["outcome"] = "reset"
            raise Reset
        gevent.sleep(stall)
        yield payload[cut:]
        entry["outcome"] = "complete"
    finally:
        entry["finished"] = time.time()


MAX_DIMENSIONS = 3072  # text-embedding-3-large's


def embeddings(start_response, body: dict, script: dict, entry: dict) -> list[bytes]:  # type: ignore[no-untyped-def]
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    dims = int(body.get("dimensions") or script.get("dims", 4))
    if dims > MAX_DIMENSIONS:  # as OpenAI refuses it; a fuzzed 10**30 would never be built
        entry["outcome"] = "complete"
        message = f"Invalid value for 'dimensions' = {dims}. Must be at most {MAX_DIMENSIONS}."
        error = {"message": message, "type": "invalid_request_error", "param": "dimensions"}
        return _json(start_response, 400, {"error": {**error, "code": None}})
    data = []
    for i in range(len(items)):
        vector = [round((i + 1) * 0.1 + d * 0.01, 4) for d in range(dims)]
        if body.get("encoding_format") == "base64":
            data.append(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode(),
                }
            )
        else:
            data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(len(str(item).split()) for item in items)
    answer = {"object": "list", "data": data, "model": body.get("model")}
    if script.get("usage") != "0":
        answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        entry["usage"] = {"input_tokens": tokens}
    entry["outcome"] = "complete"
    return _json(start_response, 200, answer)


def _json(start_response, status: int, data: object) -> list[bytes]:  # type: ignore[no-untyped-def]
    payload = json.dumps(data).encode()
    start_response(
        f"{status} {'OK' if status < 400 else 'ERROR'}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
    )
    return [payload]


class NoDelayHandler(WSGIHandler):
    """pywsgi writes headers and body in separate sends: without TCP_NODELAY, Nagle
    holds the body for the client's delayed ACK (40 ms) on every kept-alive request.
    It also ends a connection with an RST when the app raises ``Reset``."""

    def __init__(self, sock, address, server, rfile=None):  # type: ignore[no-untyped-def]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, address, server, rfile)

    def handle_error(self, t, v, tb):  # type: ignore[no-untyped-def]
        """A Reset ends the connection with an RST (SO_LINGER 0), with no 500 before it;
        a drop mid-body just closes it. Both are scripted: no traceback."""
        if isinstance(v, Reset):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if isinstance(v, Reset) or (isinstance(v, Dropped) and self.response_length):
            self.close_connection = True
            return
        super().handle_error(t, v, tb)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = WSGIServer(
        (args.host, args.port), app, log=None, error_log=None, handler_class=NoDelayHandler
    )
    server.init_socket()
    print(f"PORT {server.server_port}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
