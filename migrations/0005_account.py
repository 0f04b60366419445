"""The account (issue 10): cache prices, each call's cost and ids, what a client was sent.

``models`` gain the cache-read and cache-write prices, ``api_keys`` a monthly budget,
``completions`` the provider's response id, the cost fixed at finalisation (its
breakdown, and its total in nano-USD for sums), and for streams what the client was
actually sent; ``embeddings`` their cost. Every column is nullable: rows written before
this migration keep no cost, which is what they had.
"""

from peewee import BigIntegerField, CharField, FloatField, JSONField


def up(migrator, db):
    migrator.migrate(
        migrator.add_column("models", "cache_read_price", FloatField(null=True)),
        migrator.add_column("models", "cache_write_price", FloatField(null=True)),
        migrator.add_column("api_keys", "budget_usd", FloatField(null=True)),
        migrator.add_column("completions", "upstream_id", CharField(max_length=255, null=True)),
        migrator.add_column("completions", "cost", JSONField(null=True)),
        migrator.add_column("completions", "cost_nanos", BigIntegerField(null=True)),
        migrator.add_column("completions", "delivered", JSONField(null=True)),
        migrator.add_column("embeddings", "cost", JSONField(null=True)),
        migrator.add_column("embeddings", "cost_nanos", BigIntegerField(null=True)),
    )
