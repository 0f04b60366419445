"""Crash recovery and the key caches: record owners, process heartbeats, api_keys.updated_at.

Each call record names the process that recorded it (``owner``); each process keeps a
heartbeat row, so a surviving one can finalise a dead one's pending rows within about
a minute. Workers re-read the keys changed since their last look, by ``updated_at``.
Existing rows keep ``owner`` NULL and the old age-based sweeping rule.
"""

import datetime

from peewee import CharField, DateTimeField, IntegerField, Model


def _now():
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def up(migrator, db):
    class Heartbeat(Model):
        owner = CharField(max_length=96, unique=True)
        host = CharField(max_length=255)
        pid = IntegerField()
        started_at = DateTimeField(default=_now)
        beat_at = DateTimeField(default=_now)

        class Meta:
            database = db
            table_name = "heartbeats"

    db.create_tables([Heartbeat])
    migrator.migrate(
        migrator.add_column("completions", "owner", CharField(max_length=96, null=True)),
        migrator.add_column("embeddings", "owner", CharField(max_length=96, null=True)),
        migrator.add_index("api_keys", ("updated_at",)),
    )
