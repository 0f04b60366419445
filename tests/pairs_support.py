"""One conversation in each client format, driven by the official SDKs, and a reader of
what an upstream received, written apart from the gateway's adapters.

``request(fmt, ...)`` builds a client's call; ``call(fmt, ...)`` makes it with the
format's SDK (streaming or not) and returns an ``Answer``: what the SDK parsed, in one
shape for all three; ``with_results(fmt, ...)`` sends the SDK's own assistant turn back
with the tool results, as an application does. ``received(protocol, body)`` reads an
upstream body in the test's own words, so a conversion bug cannot hide behind the same
bug in a reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai

CHAT, ANTHROPIC, RESPONSES = "openai-chat", "anthropic", "openai-responses"
CLIENTS = (CHAT, ANTHROPIC, RESPONSES)
# The protocol each provider type speaks, by the test's own account.
UPSTREAM = {
    "openai": CHAT,
    "openai-responses": RESPONSES,
    "anthropic": ANTHROPIC,
    "azure": CHAT,
    "ollama": CHAT,
}
PROVIDERS = tuple(UPSTREAM)

SYSTEM = "You are a weather bot."
ASK = "What is the weather in Paris? Here is a photo."
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
DATA_URL = f"data:image/png;base64,{PNG}"
PARAMETERS = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
TOOLS = [("tool_0", "Weather now"), ("tool_1", "Local time")]
RESULTS = {"tool_0": "sunny", "tool_1": "noon"}
MAX_TOKENS = 4096


@dataclass
class Answer:
    """What a client's SDK made of an answer, the same shape for every format."""

    text: str
    reasoning: str
    calls: list[tuple[str, str, Any]]  # (id, name, arguments parsed)
    stop: str  # in the client's own words
    usage: tuple[int, int, int | None]  # (input incl. cached, output, cached)
    turn: list[dict]  # the assistant turn, as the SDK gives it, to send back
    signature: str | None = None  # Anthropic thinking
    stop_sequence: str | None = None  # Anthropic
    start_input: int | None = None  # Anthropic message_start's input tokens (streams)
    tool_chunks: list[tuple[int, str | None, str | None]] = field(default_factory=list)


# -- requests ---------------------------------------------------------------------


def request(fmt: str, model: str, *, tools: bool = True, **extra: Any) -> dict:
    """The first turn: system prompt, a question with an image, tools, reasoning asked."""
    if fmt == CHAT:
        body = {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": ASK},
                        {"type": "image_url", "image_url": {"url": DATA_URL}},
                    ],
                },
            ],
            "max_tokens": MAX_TOKENS,
            "reasoning_effort": "low",
        }
        if tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {"name": n, "description": d, "parameters": PARAMETERS},
                }
                for n, d in TOOLS
            ]
            body["tool_choice"] = "auto"
    elif fmt == ANTHROPIC:
        image = {"type": "base64", "media_type": "image/png", "data": PNG}
        body = {
            "system": SYSTEM,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": ASK}, {"type": "image", "source": image}],
                }
            ],
            "max_tokens": MAX_TOKENS,
            "thinking": {"type": "enabled", "budget_tokens": 2048},
        }
        if tools:
            body["tools"] = [
                {"name": n, "description": d, "input_schema": PARAMETERS} for n, d in TOOLS
            ]
            body["tool_choice"] = {"type": "auto"}
    else:
        body = {
            "instructions": SYSTEM,
            "input": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": ASK},
                        {"type": "input_image", "image_url": DATA_URL},
                    ],
                }
            ],
            "max_output_tokens": MAX_TOKENS,
            "reasoning": {"effort": "low"},
        }
        if tools:
            body["tools"] = [
                {"type": "function", "name": n, "description": d, "parameters": PARAMETERS}
                for n, d in TOOLS
            ]
            body["tool_choice"] = "auto"
    return {"model": model, **body, **extra}


def with_results(fmt: str, sent: dict, answer: Answer) -> dict:
    """The next turn: the SDK's assistant turn sent back, then each call's result."""
    if fmt == CHAT:
        results = [
            {"role": "tool", "tool_call_id": i, "content": RESULTS[n]} for i, n, _ in answer.calls
        ]
        return {**sent, "messages": [*sent["messages"], *answer.turn, *results]}
    if fmt == ANTHROPIC:
        results = [
            {"type": "tool_result", "tool_use_id": i, "content": RESULTS[n]}
            for i, n, _ in answer.calls
        ]
        user = {"role": "user", "content": results}
        return {**sent, "messages": [*sent["messages"], *answer.turn, user]}
    results = [
        {"type": "function_call_output", "call_id": i, "output": RESULTS[n]}
        for i, n, _ in answer.calls
    ]
    return {**sent, "input": [*sent["input"], *answer.turn, *results]}


# -- the SDKs -----------------------------------------------------------------------


def call(fmt: str, sdk: Any, body: dict, stream: bool, headers: dict[str, str]) -> Answer:
    """Make the call with the format's SDK and read what it parsed."""
    return {CHAT: _chat, ANTHROPIC: _anthropic, RESPONSES: _responses}[fmt](
        sdk, body, stream, headers
    )


def _chat(sdk: openai.OpenAI, body: dict, stream: bool, headers: dict[str, str]) -> Answer:
    chunks = []
    if not stream:
        final = sdk.chat.completions.create(**body, extra_headers=headers)
    else:
        with sdk.chat.completions.stream(
            **body, stream_options={"include_usage": True}, extra_headers=headers
        ) as events:
            chunks = [e.chunk for e in events if e.type == "chunk"]
            try:
                final = events.get_final_completion()
            except openai.LengthFinishReasonError as cut:  # the helper's way to say "length"
                final = cut.completion
    choice = final.choices[0]
    message = choice.message
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    if stream:
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    else:
        reasoning = getattr(message, "reasoning_content", None) or ""
    usage = final.usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else None
    return Answer(
        text=message.content or "",
        reasoning=reasoning,
        calls=[
            (c.id, c.function.name, json.loads(c.function.arguments))
            for c in message.tool_calls or []
        ],
        stop=choice.finish_reason,
        usage=(usage.prompt_tokens, usage.completion_tokens, cached),
        turn=[message.model_dump(exclude_none=True)],
        tool_chunks=[
            (t.index, t.id, t.function.name if t.function else None)
            for d in deltas
            for t in d.tool_calls or []
        ],
    )


def _anthropic(
    sdk: anthropic.Anthropic, body: dict, stream: bool, headers: dict[str, str]
) -> Answer:
    start = None
    if not stream:
        message = sdk.messages.create(**body, extra_headers=headers)
    else:
        with sdk.messages.stream(**body, extra_headers=headers) as events:
            seen = list(events)
            message = events.get_final_message()
        assert seen[0].type == "message_start" and seen[-1].type == "message_stop"
        start = _input_tokens(seen[0].message.usage)
    blocks = message.content
    thinking = [b for b in blocks if b.type == "thinking"]
    return Answer(
        text="".join(b.text for b in blocks if b.type == "text"),
        reasoning="".join(b.thinking for b in thinking),
        signature=thinking[0].signature if thinking else None,
        calls=[(b.id, b.name, b.input) for b in blocks if b.type == "tool_use"],
        stop=message.stop_reason,
        stop_sequence=message.stop_sequence,
        usage=(
            _input_tokens(message.usage),
            message.usage.output_tokens,
            message.usage.cache_read_input_tokens,
        ),
        start_input=start,
        turn=[{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in blocks]}],
    )


def _input_tokens(usage: Any) -> int:
    """Anthropic counts cached input apart; the gateway's records count it in."""
    cached = (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)
    return usage.input_tokens + cached


def _responses(sdk: openai.OpenAI, body: dict, stream: bool, headers: dict[str, str]) -> Answer:
    if not stream:
        response = sdk.responses.create(**body, extra_headers=headers)
    else:
        with sdk.responses.stream(**body, extra_headers=headers) as events:
            seen = list(events)
        assert seen[0].type == "response.created"
        assert seen[-1].type in ("response.completed", "response.incomplete")
        response = seen[-1].response
        deltas = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
        assert deltas == response.output_text
    output = response.output
    usage = response.usage
    return Answer(
        text=response.output_text,
        reasoning="".join(p.text for i in output if i.type == "reasoning" for p in i.summary),
        calls=[
            (i.call_id, i.name, json.loads(i.arguments))
            for i in output
            if i.type == "function_call"
        ],
        stop=response.status,
        usage=(usage.input_tokens, usage.output_tokens, usage.input_tokens_details.cached_tokens),
        turn=[i.model_dump(exclude_none=True) for i in output],
    )


# -- what an upstream received --------------------------------------------------------


def received(protocol: str, body: dict) -> dict:
    """An upstream body in the test's words: ``system``, ``turns`` [(role, items)],
    ``tools`` (names), ``choice``, ``max_tokens`` and ``reasoning`` (what was asked).

    Items: ``("text", t)``, ``("image", base64 or URL)``, ``("call", id, name, arguments)``,
    ``("result", id, text, images)`` and ``("reasoning",)`` for replayed reasoning.
    Tool results count as the user's turn, as Anthropic has them.
    """
    reader = {CHAT: _read_chat, ANTHROPIC: _read_anthropic, RESPONSES: _read_responses}
    system, turns = reader[protocol](body)
    merged: list[tuple[str, list]] = []
    for role, items in turns:
        items = [i for i in items if i != ("text", "")]
        if merged and merged[-1][0] == role:
            merged[-1][1].extend(items)
        elif items:
            merged.append((role, items))
    return {"system": system, "turns": merged, **_settings(protocol, body)}


def _read_chat(body: dict) -> tuple[str, list]:
    system, turns = "", []
    for m in body["messages"]:
        role, content = m["role"], m.get("content")
        if role in ("system", "developer"):
            system += content
        elif role == "tool":
            turns.append(("user", [("result", m["tool_call_id"], content, ())]))
        elif role == "user":
            turns.append(("user", _chat_parts(content)))
        else:
            items = [("reasoning",)] if m.get("reasoning_content") else []
            items += _chat_parts(content or "")
            items += [
                ("call", c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in m.get("tool_calls") or []
            ]
            turns.append(("assistant", items))
    return system, turns


def _chat_parts(content: str | list) -> list:
    if isinstance(content, str):
        return [("text", content)]
    return [
        ("text", p["text"]) if p["type"] == "text" else ("image", _image(p["image_url"]["url"]))
        for p in content
    ]


def _image(url: str | dict) -> str:
    """The base64 data of a data URL, or the URL itself (also from ``{"url": ...}``)."""
    url = url["url"] if isinstance(url, dict) else url
    return url.split(",", 1)[1] if url.startswith("data:") else url


def _read_anthropic(body: dict) -> tuple[str, list]:
    system = body.get("system") or ""
    if isinstance(system, list):
        system = "\n".join(b["text"] for b in system)
    turns = []
    for m in body["messages"]:
        content = m["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        turns.append((m["role"], [_anthropic_block(b) for b in blocks]))
    return system, turns


def _anthropic_block(block: dict) -> tuple:
    kind = block["type"]
    if kind == "text":
        return ("text", block["text"])
    if kind == "image":
        source = block["source"]
        return ("image", source["data"] if source["type"] == "base64" else source["url"])
    if kind == "tool_use":
        return ("call", block["id"], block["name"], block["input"])
    if kind in ("thinking", "redacted_thinking"):
        return ("reasoning",)
    content = block.get("content") or ""
    inner = [{"type": "text", "text": content}] if isinstance(content, str) else content
    text = "".join(b["text"] for b in inner if b["type"] == "text")
    images = tuple(_anthropic_block(b)[1] for b in inner if b["type"] == "image")
    return ("result", block["tool_use_id"], text, images)


def _read_responses(body: dict) -> tuple[str, list]:
    items = body["input"]
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    turns = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            turns.append((item["role"], _responses_parts(item["content"])))
        elif kind == "function_call":
            call = ("call", item["call_id"], item["name"], json.loads(item["arguments"]))
            turns.append(("assistant", [call]))
        elif kind == "reasoning":
            turns.append(("assistant", [("reasoning",)]))
        else:  # function_call_output
            output = item["output"]
            parts = _responses_parts(output)
            text = "".join(p[1] for p in parts if p[0] == "text")
            images = tuple(p[1] for p in parts if p[0] == "image")
            turns.append(("user", [("result", item["call_id"], text, images)]))
    return body.get("instructions") or "", turns


def _responses_parts(content: str | list) -> list:
    if isinstance(content, str):
        return [("text", content)]
    return [
        ("image", _image(p["image_url"])) if p["type"] == "input_image" else ("text", p["text"])
        for p in content
    ]


def _settings(protocol: str, body: dict) -> dict:
    if protocol == CHAT:
        choice = body.get("tool_choice")
        return {
            "tools": [t["function"]["name"] for t in body.get("tools") or []],
            "choice": choice["function"]["name"] if isinstance(choice, dict) else choice,
            "max_tokens": body.get("max_tokens") or body.get("max_completion_tokens"),
            "reasoning": body.get("reasoning_effort"),
            "stop": body.get("stop"),
        }
    if protocol == ANTHROPIC:
        choice = body.get("tool_choice") or {}
        kind = {"any": "required"}.get(choice.get("type"), choice.get("type"))
        return {
            "tools": [t["name"] for t in body.get("tools") or []],
            "choice": choice["name"] if kind == "tool" else kind,
            "max_tokens": body.get("max_tokens"),
            "reasoning": (body.get("thinking") or {}).get("budget_tokens"),
            "stop": body.get("stop_sequences"),
        }
    choice = body.get("tool_choice")
    return {
        "tools": [t["name"] for t in body.get("tools") or []],
        "choice": choice["name"] if isinstance(choice, dict) else choice,
        "max_tokens": body.get("max_output_tokens"),
        "reasoning": (body.get("reasoning") or {}).get("effort"),
        "stop": body.get("stop") or body.get("stop_sequences"),
    }
