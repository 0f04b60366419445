"""Full-text search over call records: a GIN-indexed tsvector (PostgreSQL), FTS5 (SQLite).

What is indexed: the text people wrote and read, never the JSON around it: every
message's text content (a string, or the text parts of a list; image data and tool
schemas are left out), reasoning, and tool calls' names and arguments, of the prompt
(``prompt.messages``) and of the answer (``completion``). Bounded so no record can
fail to index: the last 30,000 characters of the prompt's text (the newest turns) and
the first 30,000 of the answer's.

PostgreSQL: ``completions.search`` is a stored generated column, kept by the database
itself, ``to_tsvector('simple', ...)`` (no stemming, any language that separates its
words with spaces). ``simple`` reads a run of Chinese or Japanese as one word, so
every CJK character (and Hangul syllable) is spaced out first: a query spaces its own
the same way and matches it as a phrase, which finds any substring. The column is
not in the peewee model: the recorder's upsert never names it.

SQLite: ``completions_fts`` (the same text, trigram tokenizer: case-insensitive
substrings of any language) is kept in step with ``completions`` by triggers.

Both index a call once it has ended (a call in flight is not found by its text
yet): indexing is most of what a record's write costs, and a call is written twice.
"""

from peewee import PostgresqlDatabase

CHARS = 30000
CJK = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]"

_POSTGRES = [
    # Every text a list of chat messages holds, in order, one space apart.
    r"""
CREATE OR REPLACE FUNCTION gateway_messages_text(messages jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT coalesce(string_agg(v #>> '{}', ' '), '') FROM (
  SELECT jsonb_path_query(messages, 'lax $[*].content ? (@.type() == "string")') AS v
  UNION ALL SELECT jsonb_path_query(messages,
    'lax $[*].content[*] ? (@.type == "text" || @.type == "input_text" || @.type == "output_text").text')
  UNION ALL SELECT jsonb_path_query(messages, 'lax $[*].reasoning_content ? (@.type() == "string")')
  UNION ALL SELECT jsonb_path_query(messages, 'lax $[*].tool_calls[*].function.name ? (@.type() == "string")')
  UNION ALL SELECT jsonb_path_query(messages,
    'lax $[*].tool_calls[*].function.arguments ? (@.type() == "string")')
) AS parts
$fn$
""",
    # CJK characters one word each, so that the simple parser splits them.
    rf"""
CREATE OR REPLACE FUNCTION gateway_search_spaced(t text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $fn$
SELECT regexp_replace(t, '({CJK})', ' \1 ', 'g')
$fn$
""",
    f"""
ALTER TABLE completions ADD COLUMN search tsvector GENERATED ALWAYS AS (
  CASE WHEN status <> 'pending' THEN to_tsvector('simple'::regconfig, gateway_search_spaced(
    right(gateway_messages_text(prompt -> 'messages'), {CHARS}) || ' ' ||
    left(gateway_messages_text(completion), {CHARS})))
  END
) STORED
""",
    "CREATE INDEX completions_search ON completions USING gin (search)",
]


def _sqlite_text(column: str, messages: str) -> str:
    """SQL for the text of ``column``'s chat messages at JSON path ``messages``."""
    source = f"json_each(CASE WHEN json_valid({column}) THEN {column} END, '{messages}') m"
    return f"""coalesce((SELECT group_concat(v, ' ') FROM (
  SELECT json_extract(m.value, '$.content') AS v FROM {source}
    WHERE json_type(m.value, '$.content') = 'text'
  UNION ALL SELECT json_extract(p.value, '$.text') FROM {source}, json_each(m.value, '$.content') p
    WHERE json_type(m.value, '$.content') = 'array'
      AND json_extract(p.value, '$.type') IN ('text', 'input_text', 'output_text')
      AND json_type(p.value, '$.text') = 'text'
  UNION ALL SELECT json_extract(m.value, '$.reasoning_content') FROM {source}
    WHERE json_type(m.value, '$.reasoning_content') = 'text'
  UNION ALL SELECT coalesce(json_extract(t.value, '$.function.name'), '') || ' ' ||
      coalesce(json_extract(t.value, '$.function.arguments'), '')
    FROM {source}, json_each(m.value, '$.tool_calls') t
)), '')"""


def _sqlite_body(row: str) -> str:
    prompt = _sqlite_text(f"{row}.prompt", "$.messages")
    answer = _sqlite_text(f"{row}.completion", "$")
    return f"substr({prompt}, -{CHARS}) || ' ' || substr({answer}, 1, {CHARS})"


def _sqlite() -> list[str]:
    return [
        "CREATE VIRTUAL TABLE completions_fts USING fts5(body, tokenize = 'trigram')",
        # The recorder upserts: a new row fires the insert trigger, a rewritten one the
        # update trigger. A call is indexed once, when it ends, and again only if its
        # text changes.
        f"""CREATE TRIGGER completions_fts_insert AFTER INSERT ON completions
WHEN new.status <> 'pending' BEGIN
  INSERT INTO completions_fts (rowid, body) VALUES (new.id, {_sqlite_body("new")});
END""",
        f"""CREATE TRIGGER completions_fts_update AFTER UPDATE OF status, prompt, completion ON completions
WHEN new.status <> 'pending' AND (old.status = 'pending' OR old.prompt IS NOT new.prompt
  OR old.completion IS NOT new.completion)
BEGIN
  DELETE FROM completions_fts WHERE rowid = old.id;
  INSERT INTO completions_fts (rowid, body) VALUES (new.id, {_sqlite_body("new")});
END""",
        """CREATE TRIGGER completions_fts_delete AFTER DELETE ON completions BEGIN
  DELETE FROM completions_fts WHERE rowid = old.id;
END""",
        f"INSERT INTO completions_fts (rowid, body) SELECT id, {_sqlite_body('completions')} "
        "FROM completions",
    ]


def up(migrator, db):
    statements = _POSTGRES if isinstance(db, PostgresqlDatabase) else _sqlite()
    with db.atomic():
        for statement in statements:
            db.execute_sql(statement)
