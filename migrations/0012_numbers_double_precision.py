"""PostgreSQL: prices, weights, budgets and bucket refills in double precision.

Peewee's ``FloatField`` made them ``real`` there (4 bytes, about 7 significant digits):
a budget of 1,234,567.89 USD read back as 1,234,567.9, and near 10^9 a budget moved in
steps of 64 USD. SQLite keeps 8 bytes whatever the declaration, and changes nothing.

Each value is carried over through its text, which PostgreSQL writes as the shortest
that reads back as the same ``real`` (what psycopg returned for it): 0.1 stays 0.1,
not the 0.10000000149011612 a plain cast would make of it. ``completions.rating`` stays
as it is: the only column of the (large, partitioned) records table, rewriting it is
not worth what it would cost, and nothing computes with it.
"""

from peewee import PostgresqlDatabase

COLUMNS = {
    "models": ("input_price", "output_price", "cache_read_price", "cache_write_price", "weight"),
    "api_keys": ("budget_usd",),
    "rate_limits": ("refill",),
}


def up(migrator, db):
    if not isinstance(db, PostgresqlDatabase):
        return
    for table, columns in COLUMNS.items():
        changes = ", ".join(
            f"ALTER COLUMN {column} TYPE double precision USING {column}::text::double precision"
            for column in columns
        )
        db.execute_sql(f"ALTER TABLE {table} {changes}")
