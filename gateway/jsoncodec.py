"""JSON written at orjson's speed with ``json``'s results: the one owner of orjson.

orjson writes a call's small objects about ten times as fast as ``json``, and a call
writes a few (a stream, one per event). Where its text would differ from ``json``'s,
``json`` writes it: a lone surrogate or a key that is not a string (orjson refuses
them), an integer past 64 bits. NaN and the infinities (only an upstream's
non-standard JSON has them: a client's are refused) are written null, which any JSON
reader takes, where ``json`` wrote ``NaN``. Reading stays with ``json``: orjson reads
integers past 64 bits as floats, and the check that would catch them (a regular
expression over the text) costs what orjson saves; ``read`` goes straight to ``json``'s
own C scanner instead. Pure code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

_SURROGATE = re.compile("[\ud800-\udfff]")


def reader(**hooks: Any) -> Callable[[str | bytes], Any]:
    """``json.loads(data, **hooks)``: the same value or the same error, at about half its
    cost on a small object (a stream event: 5.0 -> 2.1 µs).

    json.loads wraps its C scanner in Python: a type check, a BOM check, the encoding's
    detection (bytes), a regular expression for whitespace at each end, and with hooks
    a new decoder every time. Text that is one JSON value and nothing else, UTF-8 if
    bytes, needs none of it; anything else (whitespace around it, a BOM, another
    encoding, not JSON) goes through json.loads, which says what it says. UTF-16 and
    UTF-32 have NUL bytes, which no JSON text can hold outside a string nor inside one,
    so read as UTF-8 they never scan whole.
    """
    scan = json.JSONDecoder(**hooks).scan_once

    def read(data: str | bytes) -> Any:
        try:
            text = data.decode() if isinstance(data, bytes) else data
            value, end = scan(text, 0)
        except (StopIteration, ValueError):  # UnicodeDecodeError is a ValueError
            return json.loads(data, **hooks)
        if end != len(text):
            return json.loads(data, **hooks)
        return value

    return read


read = reader()  # json.loads(data)


def encode(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON (a datetime written as ``isoformat()`` writes it)."""
    written = encodable(value, default)
    if written is None:
        return json.dumps(value, separators=(",", ":"), default=default).encode()
    return written


def encodable(value: Any, default: Callable[[Any], Any] | None = None) -> bytes | None:
    """``value`` as orjson writes it, or None if orjson refuses it (see the docstring)."""
    try:
        return orjson.dumps(value, default=default)
    except orjson.JSONEncodeError:
        return None


def text(value: Any) -> str:
    """Compact JSON text, UTF-8 left as is; a lone surrogate stays escaped (it has no
    UTF-8), so the text is the JSON that came in."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        out = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if out.isascii() or not _SURROGATE.search(out):
            return out
        return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", out)
