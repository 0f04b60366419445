"""PostgreSQL: a provider's sealed API key is ``text``, as 0003 meant it to be.

Until the migrate command was given the database itself rather than the app's proxy
of it, 0003 took its SQLite branch on PostgreSQL too, and left ``providers.api_key`` a
``varchar(255)``: a sealed key longer than that could not be stored. A database
migrated since then has ``text`` already, and this changes nothing there.
"""

from peewee import PostgresqlDatabase


def up(migrator, db):
    if not isinstance(db, PostgresqlDatabase):
        return
    (kind,) = db.execute_sql(
        "SELECT data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = 'providers'"
        " AND column_name = 'api_key'"
    ).fetchone()
    if kind != "text":
        db.execute_sql("ALTER TABLE providers ALTER COLUMN api_key TYPE text")
