"""JSON at orjson's speed with ``json``'s results: the one owner of orjson.

orjson is about ten times as fast as ``json`` on a call's small objects, and a call
parses and writes a few (a stream, two per event). Where its results would differ
from ``json``'s, ``json`` does the work: a lone surrogate or a key that is not a
string (orjson refuses them), an integer of 19 digits or more (orjson reads past 64
bits as a float), ``NaN`` and numbers past a double (``json`` reads them). Written,
NaN and the infinities (only an upstream's non-standard JSON has them: a client's are
refused) are null, which any JSON reader takes, where ``json`` wrote ``NaN``. Pure code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

_SURROGATE = re.compile("[\ud800-\udfff]")
_LONG_NUMBER = re.compile(rb"\d{19}")
_LONG_NUMBER_TEXT = re.compile(r"\d{19}")


def encode(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON (a datetime written as ``isoformat()`` writes it)."""
    try:
        return orjson.dumps(value, default=default)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), default=default).encode()


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


def parse(data: str | bytes) -> Any:
    """``json.loads(data)``, the same value; ValueError if it is not JSON."""
    long = _LONG_NUMBER.search(data) if isinstance(data, bytes) else _LONG_NUMBER_TEXT.search(data)
    if long is None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # json decides: it reads NaN, 1e999 and lone surrogates, or says why not
    return json.loads(data)
