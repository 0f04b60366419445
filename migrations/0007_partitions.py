"""PostgreSQL: the completions table becomes partitioned by month of ``created_at``.

Retention then drops whole months (``DROP TABLE`` of a partition) instead of deleting
rows one by one. The existing table is not copied: it is renamed and attached as the
first partition, covering everything before the first day of the month after its
newest row (or after now), so the migration takes about as long as reading the
table once (PostgreSQL checks the bound) and building its two new unique indexes,
however many rows it holds, and the full-text column is not recomputed. Partitions
follow for the next months, and a DEFAULT partition takes any row whose month has
none, so no write can ever fail for want of a partition (``gateway/partitions.py``
creates the months ahead from then on).

A partitioned table's unique indexes must include the partition key: the primary key
becomes ``(id, created_at)`` and the uid's index ``(uid, created_at)`` (a call's
``created_at`` never changes, so the recorder's upsert targets both). Lookups by id
or uid alone use these indexes' leading column in each partition.

SQLite: nothing changes (one file on one machine; retention deletes in small batches).
Both: ``srv_logs`` gets an index on ``created_at``, for retention.

Old code cannot write to the new table (its upsert names ``ON CONFLICT (uid)``, which
no longer has a unique index of its own): every instance must run the new version.
"""

import re
from datetime import UTC, datetime

from peewee import PostgresqlDatabase

MONTHS_AHEAD = 2


def _month(when: datetime, ahead: int = 0) -> datetime:
    """The first instant of ``when``'s month, ``ahead`` months later."""
    index = when.year * 12 + when.month - 1 + ahead
    return datetime(index // 12, index % 12 + 1, 1)


def _name(month: datetime) -> str:
    return f"completions_y{month.year:04d}m{month.month:02d}"


def _with_partition_key(definition: str) -> str:
    """A unique index's definition with ``created_at`` added to its columns."""
    return re.sub(r"\(([^()]*)\)", lambda m: f"({m.group(1)}, created_at)", definition, count=1)


def up(migrator, db):
    # Both backends: retention deletes server logs oldest first (and the log pages list
    # them newest first); without an index every batch would read the whole table.
    db.execute_sql("CREATE INDEX IF NOT EXISTS srv_logs_created_at ON srv_logs (created_at)")
    if not isinstance(db, PostgresqlDatabase):
        return
    now = datetime.now(UTC).replace(tzinfo=None)
    with db.atomic():
        db.execute_sql("LOCK TABLE completions IN ACCESS EXCLUSIVE MODE")
        indexes = db.execute_sql(
            "SELECT indexname, indexdef FROM pg_indexes"
            " WHERE schemaname = current_schema() AND tablename = 'completions'"
        ).fetchall()
        foreign = db.execute_sql(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'completions'::regclass AND contype = 'f'"
        ).fetchall()
        (sequence,) = db.execute_sql(
            "SELECT pg_get_serial_sequence('completions', 'id')"
        ).fetchone()
        (newest,) = db.execute_sql("SELECT max(created_at) FROM completions").fetchone()

        # The old table keeps its rows and its indexes, under new names.
        db.execute_sql("ALTER TABLE completions RENAME TO completions_legacy")
        for name, _ in indexes:
            db.execute_sql(f'ALTER INDEX "{name}" RENAME TO "{name}_legacy"')
        for name, _ in foreign:
            db.execute_sql(
                f'ALTER TABLE completions_legacy RENAME CONSTRAINT "{name}" TO "{name}_legacy"'
            )
        db.execute_sql(
            "CREATE TABLE completions (LIKE completions_legacy INCLUDING DEFAULTS"
            " INCLUDING GENERATED) PARTITION BY RANGE (created_at)"
        )
        db.execute_sql(f"ALTER SEQUENCE {sequence} OWNED BY completions.id")

        # The parent's indexes, as they were; unique ones gain the partition key.
        for name, definition in indexes:
            if name == "completions_pkey":
                db.execute_sql(
                    "ALTER TABLE completions ADD CONSTRAINT completions_pkey"
                    " PRIMARY KEY (id, created_at)"
                )
            elif definition.startswith("CREATE UNIQUE INDEX"):
                db.execute_sql(_with_partition_key(definition))
            else:
                db.execute_sql(definition)
        for name, definition in foreign:
            db.execute_sql(f'ALTER TABLE completions ADD CONSTRAINT "{name}" {definition}')

        # Its unique indexes give way to the parent's (a table has one primary key).
        db.execute_sql("ALTER TABLE completions_legacy DROP CONSTRAINT completions_pkey_legacy")
        for name, definition in indexes:
            if definition.startswith("CREATE UNIQUE INDEX") and name != "completions_pkey":
                db.execute_sql(f'DROP INDEX "{name}_legacy"')
        # Attaching reuses the old table's matching indexes; only the unique ones are built.
        until = _month(max(now, newest or now), 1)
        db.execute_sql(
            "ALTER TABLE completions ATTACH PARTITION completions_legacy"
            f" FOR VALUES FROM (MINVALUE) TO ('{until:%Y-%m-%d}')"
        )

        month = until
        while month < _month(now, MONTHS_AHEAD + 1):
            following = _month(month, 1)
            # DDL takes no parameters: the bounds are dates this code computed.
            db.execute_sql(
                f"CREATE TABLE {_name(month)} PARTITION OF completions"
                f" FOR VALUES FROM ('{month:%Y-%m-%d}') TO ('{following:%Y-%m-%d}')"
            )
            month = following
        db.execute_sql("CREATE TABLE completions_default PARTITION OF completions DEFAULT")
