"""SQLite: the recorder's rows wait in ``completions_fts_due`` and go to the index in lots.

FTS5 writes each transaction's terms as a segment of its own: the whole of a segment's
cost (every trigram of the batch's texts, the segment's pages, the merges it sets off)
was paid by every recorder write, which holds a handful of calls. Measured on SQLite
with 1,000-character texts: 760 µs a row written one at a time, 456-574 µs in writes of
5 to 10 rows (what a busy worker's recorder writes), about 260 µs when the same rows
reach the index 100 or more at a time; with 150-character texts 116-204 against 41-99
µs. So the recorder now writes a call's text here, in its write (``writes._due``),
and ``writes.index_due`` moves what is due into the index in one transaction: the
recorder once enough is due or it has waited long enough, a search before it looks.

Rows keep their ``id``: a later text for the same row replaces the one due. The
triggers of ``0006``/``0010`` index everyone else's writes at once, as before, and
now also drop what was due for a row they index or that is deleted: their text is
the newer (a retention strip, a row written again by another writer). A row due is
never lost with a process: the table is the database's, and any process empties it.
PostgreSQL indexes with a generated column and changes nothing.
"""

from peewee import PostgresqlDatabase

_DROP_DUE = "\n  DELETE FROM completions_fts_due WHERE id = old.id;"


def up(migrator, db):
    if isinstance(db, PostgresqlDatabase):
        return
    with db.atomic():
        db.execute_sql(
            "CREATE TABLE completions_fts_due (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"
        )
        for name in ("completions_fts_update", "completions_fts_delete"):
            (sql,) = db.execute_sql(
                "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?", (name,)
            ).fetchone()
            assert sql.count("BEGIN") == 1, f"{name} is not the trigger 0006/0010 made"
            db.execute_sql(f"DROP TRIGGER {name}")
            db.execute_sql(sql.replace("BEGIN", "BEGIN" + _DROP_DUE))
