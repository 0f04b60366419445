"""Provider keys as text (a sealed key outgrows varchar(255)); dashboard sessions.

``providers.api_key`` holds ``fernet:<token>`` from now on (gateway/vault.py): on
PostgreSQL the column becomes text; SQLite does not enforce varchar lengths, so it
stays. Existing plain-text keys stay readable and are sealed by ``rotate-keys``.
``dashboard_sessions`` lets logging out end a session for good.
"""

import datetime

from peewee import CharField, DateTimeField, Model, PostgresqlDatabase


def _now():
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def up(migrator, db):
    class DashboardSession(Model):
        token_hash = CharField(max_length=64, unique=True)
        created_at = DateTimeField(default=_now)

        class Meta:
            database = db
            table_name = "dashboard_sessions"

    db.create_tables([DashboardSession])
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql("ALTER TABLE providers ALTER COLUMN api_key TYPE text")
