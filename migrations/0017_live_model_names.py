"""A model's system name is unique among its provider's live models only.

``0001`` made ``(provider_id, system_name)`` unique over every row, deleted ones too:
a model could not be renamed to the name of one deleted before (a 409), and only
bringing the deleted row back made its name usable again. As the providers' names
since ``0001``, the index now holds live rows alone (raw SQL: booleans are 0/1 in
SQLite, and ``NOT deleted`` reads right on both). The old index was the stricter one,
so no row can stand in the new one's way.
"""


def up(migrator, db):
    with db.atomic():
        db.execute_sql('DROP INDEX IF EXISTS "models_provider_id_system_name"')
        db.execute_sql(
            'CREATE UNIQUE INDEX "models_provider_id_system_name" ON "models"'
            ' ("provider_id", "system_name") WHERE NOT deleted'
        )
