"""Strict JSON bodies and responses that always encode: pure units, no app."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime

import pytest
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Request

from gateway import jsonio
from tests import pairs_support

REPLACEMENT = "\ufffd"


def nested(levels: int, inner: bytes = b"1") -> bytes:
    """``levels`` objects and arrays inside each other, in a field as a client would."""
    return (
        b'{"model": "m", "x": '
        + b'[{"a": ' * (levels // 2)
        + b"[" * (levels % 2)
        + inner
        + (b"]" * (levels % 2) + b"}]" * (levels // 2) + b"}")
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"temperature": NaN}', "NaN is not a JSON number"),
        (b'{"temperature": Infinity}', "Infinity is not a JSON number"),
        (b'{"temperature": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"temperature": 1e999}', "out of range"),
        (b'{"temperature": -1e400}', "out of range"),
        (b'{"text": "\xed\xa0\x80"}', "not UTF-8"),  # CESU-8: a surrogate in bytes
        (b'{"text": "\xc0\xaf"}', "not UTF-8"),  # an overlong "/"
        (b'{"text": "\xe0\x80\xaf"}', "not UTF-8"),  # another overlong "/"
        (b'{"text": "\xff"}', "not UTF-8"),
        (b'{"n": ' + b"9" * 5000 + b"}", "digits"),
        (b'{"model": "m", ', "not valid JSON"),
        (nested(jsonio.MAX_DEPTH), "nested more than 100 levels"),  # the top object makes 101
        (nested(1000), "nested more than 100 levels"),
        (nested(100_000), "nested more than 100 levels"),  # past the recursion limit
    ],
)
def test_what_is_not_json_text_is_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(jsonio.Unreadable, match=reason):
        jsonio.loads(raw)


def test_nesting_up_to_the_bound_is_accepted_and_strings_do_not_count() -> None:
    assert jsonio.depth(nested(jsonio.MAX_DEPTH - 1)) == jsonio.MAX_DEPTH
    assert jsonio.loads(nested(jsonio.MAX_DEPTH - 1))["model"] == "m"
    text = "[{" * 500 + '\\"]}'  # brackets and an escaped quote inside one string
    raw = b'["' + text.encode() + b'"]'
    assert jsonio.depth(raw) == 1
    assert jsonio.loads(raw) == ["[{" * 500 + '"]}']
    for raw, levels in ((b"1", 0), (b"[]", 1), (b"[[],[[]]]", 3), (b'{"k": {"k": {}}}', 3)):
        assert jsonio.depth(raw) == levels


def test_what_real_clients_send_nests_far_less_than_the_bound() -> None:
    # The three SDK-shaped requests with tools and an image nest 6 or 7 deep; a tool with
    # a deep JSON schema (arrays of objects of objects) about 17.
    for fmt in pairs_support.CLIENTS:
        assert jsonio.depth(json.dumps(pairs_support.request(fmt, "m")).encode()) <= 8
    schema: dict = {"type": "integer"}
    for _ in range(7):
        schema = {"type": "object", "properties": {"p": {"type": "array", "items": schema}}}
    body = {"tools": [{"type": "function", "function": {"name": "t", "parameters": schema}}]}
    assert 20 <= jsonio.depth(json.dumps(body).encode()) <= 40 < jsonio.MAX_DEPTH


def test_refusing_costs_time_in_proportion_to_the_body() -> None:
    # An unterminated string full of escaped quotes: a string regex restarted at every
    # quote would take quadratic time (seconds for this); the parser refuses it first.
    started = time.monotonic()
    for raw in (b'["' + b'\\"' * 200_000, b"[" * 2_000_000, nested(400_000)):
        with pytest.raises(jsonio.Unreadable):
            jsonio.loads(raw)
    assert time.monotonic() - started < 5


def test_lone_surrogates_and_nul_become_replacement_characters_keys_too() -> None:
    raw = b'{"a\\ud800": ["x\\udfffy", {"n": "\\u0000"}], "ok": "\\ud83d\\ude00", "b": 1.5}'
    assert jsonio.loads(raw) == {
        f"a{REPLACEMENT}": [f"x{REPLACEMENT}y", {"n": REPLACEMENT}],
        "ok": "\U0001f600",  # a valid pair is a character, kept
        "b": 1.5,
    }
    assert jsonio.loads(b'"\\\\ud800"') == "\\ud800"  # an escaped backslash: not a surrogate
    assert jsonio.loads(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # a UTF-8 byte order mark


def test_clean_finds_what_cannot_be_stored_anywhere_in_a_row_and_keeps_the_rest() -> None:
    """The recorder's rows: mostly clean (kept as they are), with datetimes and numbers."""
    when = datetime(2026, 12, 1, 12, 0)
    row = {"created_at": when, "n": 3, "prompt": {"messages": [{"content": "ok \U0001f600"}]}}
    assert jsonio.clean(row) is row  # nothing to replace: not copied
    dirty = {"created_at": when, "prompt": [{"k\x00": ["a", "b\ud800"]}], "s": "\\u0000"}
    assert jsonio.clean(dirty) == {
        "created_at": when,
        "prompt": [{f"k{REPLACEMENT}": ["a", f"b{REPLACEMENT}"]}],
        "s": "\\u0000",  # a backslash and "u0000": text, kept
    }
    assert jsonio.clean({1: "x\x00"}) == {1: f"x{REPLACEMENT}"}


def test_responses_always_encode() -> None:
    data = {"prompt": "a\ud800b", "ok": "\U0001f600\u4e2d", "n": [1, None, True]}
    out = jsonio.dumps(data)
    assert json.loads(out) == {
        "prompt": f"a{REPLACEMENT}b",
        "ok": "\U0001f600\u4e2d",
        "n": [1, None, True],
    }
    assert jsonio.renderable("fine") == "fine"
    assert jsonio.renderable("\udc80\U0001f600") == f"{REPLACEMENT}\U0001f600"


class _Input(io.BytesIO):
    """A server's input stream that ends the body itself; counts how it was read."""

    def __init__(self, data: bytes, broken: bool = False) -> None:
        super().__init__(data)
        self.broken = broken
        self.reads: list[int | str | None] = []

    def read(self, size: int | None = None) -> bytes:
        self.reads.append(size)
        if self.broken:
            raise OSError("connection reset")
        return super().read(size)

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def,override]
        self.reads.append("into")
        return super().readinto(buffer)


def _request(body: _Input, length: str | None, limit: int | None = 100) -> Request:
    environ = {"REQUEST_METHOD": "POST", "wsgi.input": body, "wsgi.input_terminated": True}
    if length is not None:
        environ["CONTENT_LENGTH"] = length
    request = Request(environ)
    request.max_content_length = limit
    return request


def test_a_body_of_known_length_is_read_straight_from_the_servers_stream() -> None:
    body = _Input(b'{"a": 1}')
    assert jsonio.read(_request(body, "8")) == b'{"a": 1}'
    assert body.reads == [None]  # one read, unwrapped: the server ends it at its length
    unlimited = _Input(b"{}")
    assert jsonio.read(_request(unlimited, "2", limit=None)) == b"{}"
    assert unlimited.reads == [None]


@pytest.mark.parametrize("length", [None, "", "1e3", "-1"])
def test_a_body_without_a_plain_length_goes_through_werkzeug(length: str | None) -> None:
    body = _Input(b"[1]")
    assert jsonio.read(_request(body, length)) == b"[1]"
    assert body.reads and body.reads != [None]  # werkzeug's stream read it, in steps


def test_a_body_over_the_limit_is_refused_before_it_is_read() -> None:
    body = _Input(b"x" * 101)
    with pytest.raises(RequestEntityTooLarge):
        jsonio.read(_request(body, "101"))
    assert body.reads == []


def test_a_body_that_breaks_while_read_is_unreadable() -> None:
    with pytest.raises(jsonio.Unreadable, match="could not be read: connection reset"):
        jsonio.read(_request(_Input(b"{}", broken=True), "2"))
