"""A stored call, as pieces a page can show safely. Pure: no I/O, no Flask.

Prompts and answers are stored in Chat Completions form (``adapters/record.py``):
messages with a role, content as a string or a list of parts (``text``,
``image_url``, others kept as JSON), an assistant's ``tool_calls`` and
``reasoning_content``. Everything here is untrusted text: templates autoescape it,
an image is shown only from a ``data:image/...`` or ``http(s)`` URL, never from
``javascript:`` or an SVG that could carry script, and a lone surrogate (SQLite keeps
old records and upstream answers holding them) prints as U+FFFD.
"""

from __future__ import annotations

import json
import re
from typing import Any

from markupsafe import Markup

_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, only a lone one can be left
_IMAGE_DATA = re.compile(r"data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]*")
PREVIEW = 120  # characters of a prompt or input shown in a table cell


def printable(value: Any) -> Any:
    """A value a template prints, with lone surrogates made U+FFFD so the page encodes."""
    if not isinstance(value, str) or value.isascii():
        return value
    cleaned = _SURROGATE.sub("\ufffd", value)
    return Markup(cleaned) if isinstance(value, Markup) else cleaned


def image_src(url: Any) -> str | None:
    """The URL if it is safe to put in ``<img src>``, else None."""
    if not isinstance(url, str):
        return None
    if url.startswith(("https://", "http://")) or _IMAGE_DATA.fullmatch(url):
        return url
    return None


def parts(content: Any) -> list[dict[str, Any]]:
    """Message content as ``{"kind": "text"|"image"|"other", ...}`` parts, in order."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"kind": "text", "text": content}]
    if not isinstance(content, list):
        return [{"kind": "other", "json": content}]
    out: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            out.append({"kind": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            detail = image.get("detail") if isinstance(image, dict) else None
            out.append({"kind": "image", "src": image_src(url), "url": url, "detail": detail})
        else:
            out.append({"kind": "other", "json": part})
    return out


def tool_calls(message: dict) -> list[dict[str, Any]]:
    """An assistant message's tool calls: id, name and the arguments, pretty if JSON."""
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {} if isinstance(call, dict) else {}
        calls.append(
            {
                "id": call.get("id") if isinstance(call, dict) else None,
                "name": function.get("name"),
                "arguments": pretty(function.get("arguments")),
            }
        )
    return calls


def preview(value: Any, limit: int = PREVIEW) -> str:
    """A one-line preview of a prompt message or an embedding input."""
    if isinstance(value, list):
        value = next((v for v in value if v), "")
    if isinstance(value, dict):
        value = " ".join(p["text"] for p in parts(value.get("content")) if p["kind"] == "text")
    text = " ".join(str(value or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def pretty(value: Any) -> str:
    """JSON for people: indented, non-ASCII kept; a string holding JSON is unpacked."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return value  # streamed tool arguments can be cut short: show them as they are
    # An upstream's answer can nest deeper than indenting can recurse: then show it flat,
    # and if even that is too deep, show that something is there.
    for indent in (2, None):
        try:
            return json.dumps(value, indent=indent, ensure_ascii=False)
        except RecursionError:
            continue
    return "…"
