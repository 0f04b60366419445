"""Calls and embeddings lose their index on ``api_key_id`` alone.

Peewee gave every foreign key an index of its own; ``(api_key_id, created_at)`` (made
with the tables) starts with the same column, so every lookup by key alone (the
foreign key's own checks, a key's calls) can use that one, and the single-column index
was one more B-tree for every record's write to update: a page or two of SQLite's WAL
per write, an index entry per row on PostgreSQL. On PostgreSQL's partitioned
``completions`` (``0007``) dropping the parent's index drops every partition's.
"""


def up(migrator, db):
    with db.atomic():
        for table in ("completions", "embeddings"):
            db.execute_sql(f'DROP INDEX IF EXISTS "{table}_api_key_id"')
