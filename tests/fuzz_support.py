"""Hostile input for the fuzz tests: JSON values, raw bodies, headers, path segments,
chat messages.

Everything a careless or hostile client can send: wrong types, huge and tiny numbers,
text with lone surrogates, NUL and other controls, deep nesting, bytes that are not
UTF-8, NaN and Infinity literals, cut-off bodies. The fuzz tests run with a fixed seed
(``derandomize``), so CI sees the same cases every time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Cases per run: through Flask's test client, and through a real gunicorn.
EXAMPLES_FAST = int(os.environ.get("FUZZ_EXAMPLES", "1500"))
EXAMPLES_SERVER = EXAMPLES_FAST // 5

# Fixed seed, no example database in the repository, no deadline on a shared machine.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

ODD_TEXT = ["\ud800", "\udfff", "\x00", "\u2028", "\ufeff", "\u202e", "\x7f", "\r", "\\", '"']
text = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=()),  # surrogates and controls included
        st.sampled_from(ODD_TEXT),
    ),
    max_size=24,
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, 0.5, -0.0]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(text, st.just("type")), inner, max_size=4),
    ),
    max_leaves=12,
)

# Literal bytes put in place of one JSON value: not JSON text, or nested past the bound.
RAW_VALUES = [
    b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b'"\xed\xa0\x80"', b'"\xc0\xaf"',
    b'"\xff"', b"[" * 100 + b"]" * 100, b'{"a":' * 120 + b"1" + b"}" * 120, b"[[]]" * 50,
    b"[" * 99 + b"[1, 2]" + b"]" * 99, b"[" * 500 + b"]" * 500,
    b"[" * 3000 + b"]" * 3000, b"9" * 5000, b'"\\ud800"', b'"\\u0000"', b"[1,]", b"tru",
]  # fmt: skip
PLACEHOLDER = '"@@raw@@"'


@st.composite
def body_bytes(draw: Any, base: dict, fields: dict[str, Any]) -> bytes:
    """``base`` with some fields replaced or added, then maybe spoiled at the byte level."""
    body = dict(base)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        body[name] = draw(fields[name])
    if draw(st.booleans()):
        body[draw(text)] = draw(values)  # an unknown field
    if body and draw(st.integers(0, 9)) == 0:
        body.pop(draw(st.sampled_from(sorted(body))), None)
    raw_value = draw(st.integers(0, 2)) == 0
    if raw_value:  # often in a field nobody checks, where only the parser can refuse it
        body[draw(st.sampled_from([*sorted(fields), "zz", "zz", "zz"]))] = "@@raw@@"
    raw = json.dumps(body).encode()
    if raw_value:
        raw = raw.replace(PLACEHOLDER.encode(), draw(st.sampled_from(RAW_VALUES)), 1)
    spoil = draw(st.integers(0, 19))
    if spoil == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]  # cut off
    elif spoil == 1:
        raw = draw(st.binary(max_size=64))
    elif spoil == 2:
        raw = json.dumps(draw(values)).encode()  # any JSON at all
    return raw


# Headers a client might add: credential-like ones, the gateway's own, junk values.
HEADER_NAMES = [
    "x-api-key", "api-key", "x-goog-api-key", "x-custom-token", "x-session-id", "cookie",
    "anthropic-beta", "openai-beta", "x-nexusgate-provider", "x-nexusgate-reqid",
    "accept", "x-request-id", "x-stainless-lang", "user-agent",
]  # fmt: skip
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=40,
).map(str.strip)  # HTTP clients refuse to send leading or trailing spaces
headers = st.dictionaries(st.sampled_from(HEADER_NAMES), header_values, max_size=3)

# Path segments and query values: ids past every column, other digits, NUL, slashes.
ODD_SEGMENTS = [
    "0", "1", "2", "007", "\u0661", "\uff11", "\u00b2", "1.5", "%2F", "..", "sk-" + "0" * 32,
    "x" * 300, "%ED%A0%80", "%FF", *["%00", "a%00b", "%00%00", "gpt%00"] * 3,
]  # fmt: skip
segments = st.one_of(
    st.integers(min_value=-5, max_value=2**70).map(str),
    st.sampled_from(ODD_SEGMENTS),
    st.text(
        alphabet=st.characters(
            min_codepoint=0x21, max_codepoint=0x2FF, blacklist_characters="/?#%"
        ),
        min_size=1,
        max_size=12,
    ),
)


def url_text(value: str) -> str:
    """``value`` as a client can put it in a URL: a lone surrogate has no UTF-8, so it
    goes as the three bytes ``surrogatepass`` makes of it, percent-encoded (what a
    client that sends raw bytes sends); the rest as it is."""
    return "".join(
        quote(c.encode("utf-8", "surrogatepass")) if "\ud800" <= c <= "\udfff" else c for c in value
    )


query_values = st.one_of(
    segments,
    st.sampled_from(
        ["-1", "1001", "", "true", "completed", "pending", "1h", "chat", "%00", "a%00"]
    ),
)


def run(test: Callable[[], None], examples: int) -> None:
    """Run a ``@given`` test for ``examples`` cases with the fixed-seed settings."""
    settings(FUZZ, max_examples=examples)(test)()


def json_text(raw: bytes) -> bool:
    """An independent oracle: is ``raw`` JSON text as RFC 8259 has it, nested <= 100 deep?"""

    def refuse(_: str) -> None:
        raise ValueError

    def finite(number: str) -> float:
        if math.isinf(float(number)):
            raise ValueError
        return float(number)

    def depth(value: Any) -> int:
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            return 1 + max((depth(v) for v in value), default=0)
        return 0

    try:
        value = json.loads(raw.decode("utf-8-sig"), parse_constant=refuse, parse_float=finite)
        return depth(value) <= 100
    except (ValueError, RecursionError):
        return False


# Chat messages of every shape, for the full-text text: well-formed ones and odd ones
# (a part without a type, a tool call that is a number, content that is a dict...).
words = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", " ", "数据库", "ship's log", 'say "hi"', "a\\b", "\u2028", "🚢"]
)
odd = st.none() | st.integers() | st.booleans() | st.floats(allow_nan=False) | st.just({})
parts = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["text", "input_text", "output_text", "image_url", "x", 1]),
        "text": words | odd,
    },
)
functions = st.fixed_dictionaries({}, optional={"name": words | odd, "arguments": words | odd})
tool_calls = st.fixed_dictionaries(
    {"function": functions}, optional={"id": words}
) | st.fixed_dictionaries({}, optional={"function": words | odd})
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"])},
    optional={
        "content": words | odd | st.lists(parts | words | odd, max_size=3),
        "reasoning_content": words | odd,
        "tool_calls": st.lists(tool_calls, max_size=2) | st.lists(words | odd, max_size=1) | odd,
    },
)
message_lists = st.lists(messages | words | odd, max_size=4)
