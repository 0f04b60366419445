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
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import peewee as pw

from gateway.db import is_postgres

_CONFIG = pw.SQL("'simple'::regconfig")


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
