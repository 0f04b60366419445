"""JSON over HTTP, both ways: strict request bodies and responses that always encode.

A request body is JSON text (RFC 8259) or it is refused: UTF-8 only (no CESU-8
surrogate bytes, no overlong forms), no ``NaN``/``Infinity`` literals or numbers that
overflow to them, and nesting at most ``MAX_DEPTH`` deep, so nothing downstream (the
adapters, the recorder, the dashboard's pretty-printer) can recurse its way into a
``RecursionError``. Escaped lone surrogates (``"\\ud800"``) and NUL (``"\\u0000"``)
are valid JSON but cannot be stored (PostgreSQL refuses both, and a page holding a
surrogate cannot be encoded): they become U+FFFD in what is forwarded and recorded
alike, so the record is what was sent. Responses never fail to encode either.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from flask import Request, Response
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from gateway import jsoncodec

MAX_DEPTH = 100  # real clients nest about 10 deep, tool schemas up to about 20
REPLACEMENT = "\ufffd"

# A lone surrogate or NUL, as Python holds them after json.loads; and their escapes in
# the raw text, the only way they can get in (raw UTF-8 cannot carry either).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
# What is not a bracket of the structure: a whole string (the text is known to be valid
# JSON when this runs, so every string is closed), or a run of anything else.
_NOT_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[^\[\]{}"]+', re.DOTALL)


class Unreadable(ValueError):
    """A request body that is not acceptable JSON; the message says why."""


def read(request: Request) -> bytes:
    """The raw body; a broken one (bad chunked framing, cut short) is Unreadable.

    A body of a known length within the limit, from a server that ends its input stream
    itself (gunicorn), is read from that stream straight: what werkzeug's stream would
    read, without its wrapping (about 15 µs of a call at one client). Anything else
    (no length, too large) goes through werkzeug's checks; a chunked body past the
    limit is refused here (413), as one whose length says so.
    """
    environ = request.environ
    length = environ.get("CONTENT_LENGTH", "")
    limit = request.max_content_length
    try:
        if environ.get("wsgi.input_terminated"):
            if length.isdecimal() and (limit is None or int(length) <= limit):
                return environ["wsgi.input"].read()
            if not length and limit is not None:
                # Chunked: werkzeug's stream would stop at the limit and say nothing,
                # and what was cut off would be parsed (or forwarded) as the body.
                raw = environ["wsgi.input"].read(limit + 1)
                if len(raw) > limit:
                    raise RequestEntityTooLarge()
                return raw
        return request.get_data(cache=False)
    except HTTPException:
        raise  # too large, or Werkzeug's own 400: rendered by the app's handlers
    except Exception as exc:  # gunicorn's ParseException kinds and socket errors
        raise Unreadable(f"Request body could not be read: {exc}") from exc


def loads(raw: bytes) -> Any:
    """Parse a request body strictly (see the module docstring); Unreadable if refused."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Unreadable(f"Request body is not valid JSON: not UTF-8 text ({exc.reason})") from exc
    try:
        value = _strict(text)
    except RecursionError as exc:
        raise _too_deep() from exc
    except ValueError as exc:
        raise Unreadable(f"Request body is not valid JSON: {exc}") from exc
    # Counting openers is cheap and bounds the depth: most bodies stop there.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and depth(raw) > MAX_DEPTH:
        raise _too_deep()
    if _UNSTORABLE_ESCAPE.search(raw):
        value = clean(value)
    return value


def depth(raw: bytes, stop: int = MAX_DEPTH + 1) -> int:
    """How deep the arrays and objects of valid JSON text nest, counted up to ``stop``."""
    # Brackets inside strings do not count. Linear, because every string is closed: an
    # unclosed one would make the regex rescan the rest from each quote.
    brackets = _NOT_BRACKET.sub(b"", raw).translate(_ONE_KIND)
    level = 0
    while brackets and level < stop:  # each pass peels the innermost level off
        peeled = brackets.replace(b"[]", b"")
        if peeled == brackets:
            break
        brackets, level = peeled, level + 1
    return level


_ONE_KIND = bytes.maketrans(b"{}", b"[]")


def clean(value: Any) -> Any:
    """``value`` with every lone surrogate and NUL in its strings (keys too) made U+FFFD."""
    if isinstance(value, str):
        return _UNSTORABLE.sub(REPLACEMENT, value)
    if isinstance(value, list | dict) and _storable(value):
        return value  # nearly always: one pass in C instead of a walk in Python
    if isinstance(value, list):
        return [clean(item) for item in value]
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    return value


def _storable(value: list | dict) -> bool:
    """True when ``value`` surely holds no lone surrogate and no NUL (keys included)."""
    # orjson refuses a lone surrogate (and keys that are not strings, and nesting past
    # its limit): then the walk decides. A NUL comes out escaped.
    written = jsoncodec.encodable(value, default=str)
    return written is not None and b"\\u0000" not in written


def renderable(text: str) -> str:
    """``text`` with lone surrogates made U+FFFD, so that it encodes as UTF-8."""
    return text if text.isascii() else _SURROGATE.sub(REPLACEMENT, text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(data: object) -> bytes:
    """JSON bytes for a response; a lone surrogate in stored text shows as U+FFFD."""
    # ensure_ascii=False keeps valid pairs as one code point, so any surrogate left in
    # the text is a lone one.
    return renderable(json.dumps(data, ensure_ascii=False)).encode()


def response(data: object, status: int = 200) -> Response:
    """A JSON response."""
    return Response(dumps(data), status=status, mimetype="application/json")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _too_deep() -> Unreadable:
    return Unreadable(f"Request body is not valid JSON: nested more than {MAX_DEPTH} levels deep")


_strict = jsoncodec.reader(parse_constant=_refuse_constant, parse_float=_finite_float)
