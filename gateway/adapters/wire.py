"""Small pieces every wire-format module shares: ids, compact JSON, counts, event data, image URLs.

Pure code. Nothing here knows a protocol; protocol vocabulary lives in its own package.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from gateway import jsoncodec, sse
from gateway.adapters import ir

_DATA_URL = re.compile(r"data:(?P<media>[\w.+-]+/[\w.+-]+)?(?:;[^,;]*)*;base64,(?P<data>.*)", re.S)


def new_id(prefix: str) -> str:
    """A fresh id in the style the protocol uses (``chatcmpl-``, ``msg_``, ``resp_``...)."""
    return prefix + uuid.uuid4().hex[:24]


def dumps(data: Any) -> str:
    """Compact JSON, UTF-8 left as is, as the providers send it."""
    return jsoncodec.text(data)


def arguments(value: Any) -> str:
    """A tool call's arguments as JSON text: some OpenAI-compatible servers send the
    object itself where the API has its text."""
    if isinstance(value, str):
        return value
    return "" if value is None else dumps(value)


def frame(data: Any, event: str | None = None) -> bytes:
    """One SSE frame holding ``data`` as compact JSON."""
    return sse.encode(dumps(data), event=event)


def count(value: Any) -> int | None:
    """A count (tokens, an index), or None when the value cannot be one: not an integer,
    below 0, or past ``ir.MAX_COUNT`` (an upstream's fault; a record keeps it unknown).
    A whole float is its integer: JSON has one kind of number, and ``12.0`` is 12."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return ir.bounded(value) if isinstance(value, int) and not isinstance(value, bool) else None


def details(usage: dict, key: str) -> dict:
    """A usage object's breakdown (``prompt_tokens_details``...), ``{}`` when it is not an
    object: its counts are then unknown, and the answer, whole, is no less usable."""
    value = usage.get(key)
    return value if isinstance(value, dict) else {}


def provider_text(value: Any) -> str | None:
    """A provider's id or model name as a record keeps it: printable text, at most 255
    characters (its column's), else None."""
    return value[:255] if isinstance(value, str) and value.isprintable() and value else None


class ErrorAnswer(ValueError):
    """A 2xx answer whose body is an error (some servers and proxies send them so): the
    try failed as one with an unusable answer does, and fails over likewise."""


def error_answer(error: Any, fallback: Any = None) -> ErrorAnswer:
    """``ErrorAnswer`` saying what an error object (or string) of an answer says."""
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code")
        message = error.get("message") or fallback
    else:
        kind, message = None, error if isinstance(error, str) else fallback
    said = ": ".join(str(part) for part in (kind, message) if part)
    return ErrorAnswer(f"the upstream answered an error with a 2xx status ({said or 'no detail'})")


def blank(event: sse.Event) -> bool:
    """An event with no data, or only blanks (a keep-alive): nothing to read, nor to
    relay (an SDK reading its data as JSON would fail on it)."""
    return not event.data or event.data.isspace()


def event_data(event: sse.Event) -> dict | None:
    """The JSON object an SSE event carries, or None (no data, not JSON, not an object, or
    nested deeper than ``json`` reads: its RecursionError is an upstream's fault too)."""
    if not event.data:
        return None
    try:
        data = jsoncodec.read(event.data)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def image_block(url: str, detail: str | None = None) -> dict:
    """An IR image block from an image URL (a data URL becomes a base64 source)."""
    match = _DATA_URL.fullmatch(url)
    if match:
        media = match["media"] or "image/jpeg"
        source = {"type": "base64", "media_type": media, "data": match["data"]}
    else:
        source = {"type": "url", "url": url}
    return {"type": "image", "source": source, "detail": detail}


def image_url(block: dict) -> str:
    """The URL of an IR image block (base64 sources become data URLs)."""
    source = block["source"]
    if source["type"] == "base64":
        return f"data:{source['media_type']};base64,{source['data']}"
    return source["url"]
