"""Full-text matching of call records: the condition that finds words in prompts and answers.

The index is the database's own (``migrations/0006_search.py``): on PostgreSQL the
generated ``completions.search`` tsvector with its GIN index, on SQLite the
``completions_fts`` FTS5 table that triggers keep in step. Every term must match:

- PostgreSQL: a term is a phrase of whole words (``phraseto_tsquery('simple')``, no
  stemming: "server" does not find "servers"); Chinese, Japanese and Korean text is
  matched as a substring, because each character is its own word in the index and
  the term is spaced the same way (``gateway_search_spaced``).
- SQLite: a term is a case-insensitive substring (trigram index); a term shorter
  than three characters has no trigram and is looked for by a scan of the indexed
  text instead (fine at SQLite's scale).

On SQLite the recorder gives the index a call's text itself (``body``, the text the
triggers would take out of the stored JSON, from the messages it has in hand), which
spares SQLite parsing the JSON again per message (``migrations/0010``), and in lots:
its writes leave the text due and ``writes.index_due`` indexes many calls' at once,
a search first (``migrations/0014``).
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import peewee as pw

from gateway.db import is_postgres

_CONFIG = pw.SQL("'simple'::regconfig")
CHARS = 30000  # migrations/0006's: the last of a prompt's text, the first of an answer's
PART_TYPES = ("text", "input_text", "output_text")  # content parts whose text is indexed


class _Unusual(Exception):
    """Messages of a shape whose text only SQLite's JSON functions can say exactly."""


def condition(table: Any, terms: list[str]) -> Any:
    """A WHERE condition on ``table`` (completions) that every term matches."""
    if is_postgres():
        queries = [pw.fn.phraseto_tsquery(_CONFIG, pw.fn.gateway_search_spaced(t)) for t in terms]
        tsquery = reduce(lambda a, b: pw.Expression(a, "&&", b), queries)
        return pw.Expression(pw.Column(table._meta.table, "search"), "@@", tsquery)
    long = [t for t in terms if len(t) >= 3]
    short = [t for t in terms if len(t) < 3]
    where, params = [], []
    if long:
        # An FTS5 string per term: a phrase, its double quotes doubled.
        where.append("completions_fts MATCH ?")
        params.append(" AND ".join('"' + t.replace('"', '""') + '"' for t in long))
    for term in short:
        where.append("instr(lower(body), lower(?)) > 0")
        params.append(term)
    found = pw.SQL(f"(SELECT rowid FROM completions_fts WHERE {' AND '.join(where)})", params)
    return table.id.in_(found)


def body(prompt: Any, completion: Any) -> str | None:
    """The text SQLite's index keeps for a call with this prompt and answer (a row's
    values), exactly as ``migrations/0006``'s triggers take it out of the stored JSON:
    the last ``CHARS`` characters of the prompt's messages' text, a space, the first
    ``CHARS`` of the answer's. None where a message has an unusual shape (not an object,
    a tool call's name that is not a string...): the triggers then index the row.
    """
    try:
        asked = _text(prompt.get("messages", []) if isinstance(prompt, dict) else [])
        answered = _text([] if completion is None else completion)
    except _Unusual:
        return None
    return asked[-CHARS:] + " " + answered[:CHARS]


def _text(messages: Any) -> str:
    """The messages' text, in the triggers' order: every string content, every text
    part, every reasoning, every tool call's name and arguments, one space apart."""
    if not isinstance(messages, list):
        raise _Unusual
    contents: list[str] = []
    parts: list[str] = []
    reasoning: list[str] = []
    tools: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise _Unusual
        content = message.get("content")
        if isinstance(content, str):
            contents.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise _Unusual
                kind, text = part.get("type"), part.get("text")
                if isinstance(kind, str) and kind in PART_TYPES and isinstance(text, str):
                    parts.append(text)
        if isinstance(message.get("reasoning_content"), str):
            reasoning.append(message["reasoning_content"])
        if "tool_calls" in message:
            tools += [_tool_call(call) for call in _listed(message["tool_calls"])]
    return " ".join(contents + parts + reasoning + tools)


def _listed(value: Any) -> list:
    if not isinstance(value, list):
        raise _Unusual
    return value


def _tool_call(call: Any) -> str:
    if not isinstance(call, dict):
        raise _Unusual
    function = call.get("function")
    name, arguments = (
        (function.get("name"), function.get("arguments"))
        if isinstance(function, dict)
        else (None, None)
    )
    # SQLite would write a number or an object as its own text of it: not ours to guess.
    if not isinstance(name, str | None) or not isinstance(arguments, str | None):
        raise _Unusual
    return (name or "") + " " + (arguments or "")
