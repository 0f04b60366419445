"""orjson's speed, json's results: every value writes as with ``json``."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import jsoncodec, jsonio
from tests.fuzz_support import FUZZ

# What upstreams and clients send, and the edges where orjson alone would differ.
_CHARS = ["a", "é", "中", "\U0001f600", "\x00", "\x1f", "\x7f", "\n", "\u2028", "/", '"', "\\"]
_TEXT = st.lists(st.sampled_from([*_CHARS, "\ud800", "\udfff", "1234567890"])).map("".join)
_NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), 10**19, 10**18]),
    st.floats(allow_nan=False, allow_infinity=False),
)
_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), _NUMBER, _TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)),
    max_leaves=12,
)


def _same(a: object, b: object) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0, -0.0 is not 0.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.copysign(1, a) == math.copysign(1, b) and (a == b or (a != a and b != b))
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[index]
    return a == b


def _before(value: object) -> str:
    """What ``wire.dumps`` wrote with json alone: compact, UTF-8, lone surrogates escaped."""
    out = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m[0]):04x}", out)


def _floats(value: object) -> bool:
    if isinstance(value, list):
        return any(_floats(v) for v in value)
    if isinstance(value, dict):
        return any(_floats(v) for v in value.values())
    return isinstance(value, float)


@settings(FUZZ, max_examples=1500)
@given(_VALUE)
def test_text_is_the_json_text_json_wrote_floats_aside(value: object) -> None:
    """The same text as before, but for how a float is spelled (``1e-05``, ``1e-5``):
    the same number either way."""
    written = jsoncodec.text(value)
    assert written.encode("utf-8")  # a lone surrogate stays escaped: the text encodes
    assert _same(json.loads(written), json.loads(_before(value)))
    if not _floats(value):
        assert written == _before(value)


def test_a_number_json_has_no_spelling_for_is_written_null() -> None:
    """NaN and infinities come only from an upstream's non-standard JSON (a client's are
    refused): written as null, valid JSON for the client, where json wrote ``NaN``."""
    assert jsoncodec.text([math.nan, math.inf, -math.inf, 1.5]) == "[null,null,null,1.5]"
    assert jsoncodec.encode({"x": math.inf}) == b'{"x":null}'


def test_encode_writes_what_json_reads_back_even_what_orjson_refuses() -> None:
    """The upstream body and the stored record: orjson, and ``json`` for the rest."""
    common = {"model": "m", "messages": [{"content": "é \U0001f600 \x00"}], "t": 1.5, "n": None}
    assert json.loads(jsoncodec.encode(common)) == common
    for refused in (
        {"text": "a\ud800b"},  # a lone surrogate: escaped, as json writes it
        {1: "int key"},  # json writes the key as a string
        {"seed": 2**70},  # past 64 bits: exact, not a float
    ):
        assert jsoncodec.encode(refused) == json.dumps(refused, separators=(",", ":")).encode()
        assert jsoncodec.encodable(refused) is None
    when = datetime(2026, 12, 1, 12, 0, 0, 500)
    assert jsoncodec.encode({"at": when}) == b'{"at":"%s"}' % when.isoformat().encode()
    assert jsoncodec.encode({"x": {1}}, sorted) == b'{"x":[1]}'  # default= reaches both
    assert jsoncodec.encode({"x": {1}, "s": "\ud800"}, sorted) == b'{"x":[1],"s":"\\ud800"}'
    with pytest.raises(TypeError):
        jsoncodec.encode({"x": object()})


def _outcome(read: object, data: str | bytes) -> tuple[str, object]:
    try:
        return "value", read(data)  # type: ignore[operator]
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        return type(exc).__name__, str(exc)


# JSON texts, and texts that are nearly JSON: cut, padded, prefixed, in other encodings.
_JSONISH = st.one_of(
    _VALUE.map(json.dumps),
    _VALUE.map(lambda v: json.dumps(v, ensure_ascii=False)),
    st.text(alphabet=' \t\r\n{}[]":,-+.0123456789eEtrufalsn\\\x00\ufeffa中'),
    st.sampled_from(["NaN", "[Infinity]", '{"a": -Infinity}', "1e999", "[-1e400, 2]", "0.5"]),
)
_DAMAGE = st.sampled_from(
    [lambda t: t, lambda t: " " + t, lambda t: t + "\n", lambda t: t[:-1], lambda t: t + "x",
     lambda t: "\ufeff" + t, lambda t: t + t]
)  # fmt: skip
_ENCODE = st.sampled_from(
    [lambda t: t, lambda t: t.encode("utf-8", "surrogatepass"), lambda t: t.encode("utf-16", "surrogatepass"),
     lambda t: t.encode("utf-16-le", "surrogatepass"), lambda t: t.encode("utf-32-be", "surrogatepass"),
     lambda t: t.encode("utf-8-sig", "surrogatepass"), lambda t: t.encode("latin-1", "replace")]
)  # fmt: skip


# No hooks (``read``), and the hooks the request body's strict reading uses.
_HOOKS = st.sampled_from(
    [{}, {"parse_constant": jsonio._refuse_constant, "parse_float": jsonio._finite_float}]
)


@settings(FUZZ, max_examples=1000)
@given(_JSONISH, _DAMAGE, _ENCODE, _HOOKS)
def test_a_reader_gives_what_json_loads_gives_the_same_value_or_the_same_error(
    text: str, damage: Callable[[str], str], encode: Callable[[str], str | bytes], hooks: dict
) -> None:
    data = encode(damage(text))
    read = jsoncodec.reader(**hooks) if hooks else jsoncodec.read
    got = _outcome(read, data)
    wanted = _outcome(lambda d: json.loads(d, **hooks), data)
    assert got[0] == wanted[0]
    assert _same(got[1], wanted[1]) if got[0] == "value" else got[1] == wanted[1]


def test_read_refuses_deep_nesting_as_json_loads_does() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    assert _outcome(jsoncodec.read, deep)[0] == _outcome(json.loads, deep)[0] == "RecursionError"
