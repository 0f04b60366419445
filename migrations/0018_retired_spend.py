"""What the records retention deleted had cost, per key and budget month.

A key's monthly budget is checked against the spend in the limits' store, which is
raised to the records' figure when it may have forgotten (``spend.py``). With
``RETENTION_DAYS`` under a month, retention deleted records of the month in progress,
and their cost went with them: after a Redis restart, or in a new worker without
Redis, the budget counted only the records left. Retention now adds each deleted final
record's cost to its key's month here, in the transaction that deletes it, and the
budget's figure counts it (``ledger.month_spend``).
"""


def up(migrator, db):
    with db.atomic():
        db.execute_sql(
            'CREATE TABLE IF NOT EXISTS "retired_spend" ('
            '"api_key_id" INTEGER NOT NULL, "month" VARCHAR(7) NOT NULL,'
            ' "nanos" BIGINT NOT NULL, PRIMARY KEY ("api_key_id", "month"))'
        )
