"""SQLite: the full-text index merges its segments eight at a time, not four.

FTS5 writes each transaction's terms as a new segment of its index, and its
``automerge`` setting (4 by default) merges segments in the writes that follow as soon
as four wait at one level. With the trigram tokenizer every character of a call's text
is a term, so indexing is most of what writing a record costs on SQLite (about 115 µs
of a small call's 130, 1.4 to 1.9 ms for a call with an 8,000-character prompt), and
merging was a good part of it: at 8 the same rows cost 8 to 18% less CPU to write
(measured in pairs, 1,500 texts of 8,000 characters in batches of 25), and searches
take the same time within the noise (the index holds at most twice the segments per
level). At 16 a write now and then had to merge everything at once (``crisismerge``):
one batch took 1.5 s. The setting is kept in the index (``completions_fts_config``),
for every connection. PostgreSQL indexes with a generated column and changes nothing.
"""

from peewee import PostgresqlDatabase


def up(migrator, db):
    if isinstance(db, PostgresqlDatabase):
        return
    db.execute_sql("INSERT INTO completions_fts (completions_fts, rank) VALUES ('automerge', 8)")
