"""PostgreSQL: the text of a call's messages is read by a PL/pgSQL function, not SQL's.

``completions.search`` (``0006``) is a generated column, and PostgreSQL plans a table's
generated expressions each time a statement that writes the table starts. Planning
them, it tried to inline ``gateway_messages_text`` (a SQL function): it parsed and
analysed the function's body, found it could not be inlined (a subquery), and gave
up, for every INSERT or UPDATE of the table, even one whose rows are all pending and
never call it; and a statement that did call it then planned the body once more.
Measured on PostgreSQL 15, the server's own CPU: a statement of one pending row 540-660
µs (a plain table's row 165), of one final row 1,080-1,170 µs. A PL/pgSQL function is
never a candidate for inlining, and it plans its query once per connection.

The query is the same, word for word, so every text it gives is the same, and the rows
written before keep their ``search``: after this, 220 µs for one pending row, 500 for
one final row; in the recorder's statements of 25 rows, 53-87 -> 33 µs a pending row
and 273-347 -> 247 µs a final one. SQLite: nothing changes.
"""

from peewee import PostgresqlDatabase

# The query of 0006's SQL function, unchanged: every text a list of chat messages holds.
_TEXT = r"""
CREATE OR REPLACE FUNCTION gateway_messages_text(messages jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
BEGIN
RETURN (
SELECT coalesce(string_agg(v #>> '{}', ' '), '') FROM (
  SELECT jsonb_path_query(messages, 'lax $[*].content ? (@.type() == "string")') AS v
  UNION ALL SELECT jsonb_path_query(messages,
    'lax $[*].content[*] ? (@.type == "text" || @.type == "input_text" || @.type == "output_text").text')
  UNION ALL SELECT jsonb_path_query(messages, 'lax $[*].reasoning_content ? (@.type() == "string")')
  UNION ALL SELECT jsonb_path_query(messages, 'lax $[*].tool_calls[*].function.name ? (@.type() == "string")')
  UNION ALL SELECT jsonb_path_query(messages,
    'lax $[*].tool_calls[*].function.arguments ? (@.type() == "string")')
) AS parts
);
END
$fn$
"""


def up(migrator, db):
    if not isinstance(db, PostgresqlDatabase):
        return
    db.execute_sql(_TEXT)
