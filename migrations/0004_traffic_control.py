"""Traffic control: per-model limits, a key's maxConcurrent, replays linked by uid.

- ``rate_limits``: the ``/api/admin/ratelimits`` configs, one row per identifier (every
  instance applies them; NexusGate kept them in one process's memory).
- ``api_keys.max_concurrent``: calls a key may have in flight at once (NULL: unlimited).
- ``completions.source_uid``: a cache_hit names its source by uid; the recorder fills
  ``source_completion_id`` in from it once both rows exist.
- The request-id index is no longer unique: a failed call's id is retried as a new call,
  and without Redis two workers may run one id at once; neither may cost a record.
"""

import datetime

from peewee import CharField, DateTimeField, FloatField, IntegerField, Model


def _now():
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def up(migrator, db):
    class RateLimit(Model):
        identifier = CharField(max_length=255, unique=True)
        limit = IntegerField()
        refill = FloatField()
        created_at = DateTimeField(default=_now)
        updated_at = DateTimeField(default=_now)

        class Meta:
            database = db
            table_name = "rate_limits"

    db.create_tables([RateLimit])
    migrator.add_column("api_keys", "max_concurrent", IntegerField(null=True)).run()
    migrator.add_column("completions", "source_uid", CharField(max_length=32, null=True)).run()
    # Partial indexes in SQL: the migrator's add_index has no WHERE clause.
    db.execute_sql('DROP INDEX IF EXISTS "completions_api_key_id_req_id"')
    db.execute_sql(
        'CREATE INDEX "completions_api_key_id_req_id" ON "completions" ("api_key_id", "req_id")'
        ' WHERE "req_id" IS NOT NULL'
    )
    db.execute_sql(
        'CREATE INDEX "completions_source_uid" ON "completions" ("source_uid")'
        ' WHERE "source_uid" IS NOT NULL'
    )
