"""SQLite: the recorder indexes the text of the calls it writes itself; the triggers of
``0006_search`` index everyone else's writes, as before.

The triggers take a call's text out of its stored JSON with SQLite's JSON functions,
which parse the prompt and the answer again for every branch and every message: most
of what a record's write costs on SQLite (about 45 µs of a small call's 75 µs, and
more as prompts grow). The recorder has the call's messages in hand, so it gives the
index the same text itself (``gateway.fulltext.body``) in the write's transaction.

``completions_fts_writer`` holds one flag, 0 outside the recorder's writes: the
recorder sets it for the rows it indexes, within its transaction, and sets it back
before the end (a rolled back write leaves it 0 too). No other connection ever sees
it set: SQLite has one writer at a time and the flag is never committed set. Rows
whose text the recorder cannot take out exactly as the triggers would (an unusual
shape) are written with the flag down: the triggers index them. PostgreSQL indexes
with a generated column, which stays as it is.
"""

from peewee import PostgresqlDatabase

_WHEN = "WHEN new.status <> 'pending'"
_SKIP = "AND NOT (SELECT indexing FROM completions_fts_writer)"


def up(migrator, db):
    if isinstance(db, PostgresqlDatabase):
        return
    with db.atomic():
        db.execute_sql("CREATE TABLE completions_fts_writer (indexing INTEGER NOT NULL)")
        db.execute_sql("INSERT INTO completions_fts_writer (indexing) VALUES (0)")
        for name in ("completions_fts_insert", "completions_fts_update"):
            (sql,) = db.execute_sql(
                "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?", (name,)
            ).fetchone()
            assert sql.count(_WHEN) == 1, f"{name} is not the trigger 0006 made"
            db.execute_sql(f"DROP TRIGGER {name}")
            db.execute_sql(sql.replace(_WHEN, f"{_WHEN} {_SKIP}"))
