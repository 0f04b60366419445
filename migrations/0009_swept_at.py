"""When the sweeper finalised a record, kept after the call's own final state replaces it.

The sweeper finalises a dead process's pending rows (``failed``, ``swept``); if the
process was alive after all, its own final snapshot replaces that row later, and
``swept`` goes back to false so nothing replaces it again. ``swept_at`` stays: the
record keeps the evidence that it was once reported orphaned, and the recorder reads
it back with the write (``RETURNING``), so the span of the true outcome can say that
it supersedes the orphaned one (``gateway.record.supersedes_swept``). Rows swept
before this migration, still waiting for their call's own state, get their
``updated_at`` (the sweep's time).
"""

from peewee import DateTimeField


def up(migrator, db):
    migrator.migrate(
        migrator.add_column("completions", "swept_at", DateTimeField(null=True)),
        migrator.add_column("embeddings", "swept_at", DateTimeField(null=True)),
    )
    for table in ("completions", "embeddings"):
        # Swept rows are failed: the (status, created_at) index finds them.
        db.execute_sql(
            f"UPDATE {table} SET swept_at = updated_at WHERE status = 'failed' AND swept"
        )
