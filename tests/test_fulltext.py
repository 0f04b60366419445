"""The text the recorder gives SQLite's index is the text migration 0006's triggers take.

``fulltext.body`` reads a row's prompt and answer as Python values; the triggers read the
same values stored as JSON, with SQLite's JSON functions. Here both read the same
values: whatever the messages hold, the recorder's text is the triggers' to the
character, or it says None and leaves the row to them.
"""

from __future__ import annotations

import runpy
import sqlite3
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import fulltext, jsoncodec, jsonio
from gateway.config import ROOT
from tests.fuzz_support import FUZZ, message_lists, messages, odd, words

_sqlite_body = runpy.run_path(str(ROOT / "migrations" / "0006_search.py"))["_sqlite_body"]
_SQL = f"SELECT {_sqlite_body('x')} FROM (SELECT ? AS prompt, ? AS completion) AS x"
_conn = sqlite3.connect(":memory:")


def triggers_body(prompt: Any, completion: Any) -> str | Exception:
    """What the triggers index for a row with these values (stored as the upsert stores
    them), or the error SQLite raises over them."""
    stored = [None if v is None else jsoncodec.encode(v).decode() for v in (prompt, completion)]
    try:
        return _conn.execute(_SQL, stored).fetchone()[0]
    except sqlite3.Error as exc:
        return exc


def same_as_the_triggers(prompt: Any, completion: Any) -> str | None:
    prompt, completion = jsonio.clean(prompt), jsonio.clean(completion)  # as rows are taken
    ours = fulltext.body(prompt, completion)
    if ours is not None:
        assert ours == triggers_body(prompt, completion)
    return ours


@settings(FUZZ, max_examples=1500)
@given(
    st.none() | st.fixed_dictionaries({}, optional={"messages": message_lists | odd | words}),
    st.none() | message_lists | st.dictionaries(words, words, max_size=2),
)
def test_whatever_the_messages_hold_the_text_is_the_triggers_or_theirs_to_take(
    prompt: Any, completion: Any
) -> None:
    same_as_the_triggers(prompt, completion)


@settings(FUZZ, max_examples=500)
@given(st.lists(messages, max_size=4), st.lists(messages, max_size=2))
def test_well_formed_messages_are_indexed_by_the_recorder_unless_a_tool_call_is_odd(
    asked: list[dict], answered: list[dict]
) -> None:
    ours = same_as_the_triggers({"messages": asked, "model": "m"}, answered)
    odd_call = any(
        not isinstance(m.get("tool_calls", []), list)
        or any(not isinstance(c, dict) for c in m.get("tool_calls", []))
        or any(
            not isinstance(f.get(k), str | None)
            for c in m.get("tool_calls", [])
            if isinstance(c, dict) and isinstance(f := c.get("function"), dict)
            for k in ("name", "arguments")
        )
        or (
            isinstance(m.get("content"), list)
            and any(not isinstance(p, dict) for p in m["content"])
        )
        for m in asked + answered
    )
    assert (ours is None) == odd_call


def test_a_call_s_usual_messages_in_the_triggers_order_and_bounds() -> None:
    long = "x" * (fulltext.CHARS + 10)
    prompt = {
        "messages": [
            {"role": "system", "content": "be terse"},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url"}]},
            {"role": "assistant", "content": None, "reasoning_content": "hmm", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
            ]},
            {"role": "user", "content": long + "END"},
        ]
    }  # fmt: skip
    answer = [{"role": "assistant", "content": "START" + long}]
    text = same_as_the_triggers(prompt, answer)
    assert text is not None
    asked, answered = text[: fulltext.CHARS], text[fulltext.CHARS + 1 :]
    assert asked.endswith('END look hmm f {"a": 1}')  # contents, parts, reasoning, calls
    assert answered.startswith("START") and len(answered) == fulltext.CHARS
    assert same_as_the_triggers(None, None) == " "
