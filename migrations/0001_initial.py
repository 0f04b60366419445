"""Create the tables: api_keys, providers, models, completions, embeddings, srv_logs, settings.

A frozen copy of the schema as it was when this migration was written; later
migrations change it with migrator operations and never edit this file.
"""

import datetime

from peewee import (
    SQL,
    BooleanField,
    CharField,
    DateTimeField,
    FloatField,
    ForeignKeyField,
    IntegerField,
    JSONField,
    Model,
    TextField,
)


def _now():
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def up(migrator, db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class ApiKey(Base):
        key_hash = CharField(max_length=64, unique=True)
        key_hint = CharField(max_length=32)
        comment = TextField(null=True)
        created_at = DateTimeField(default=_now)
        updated_at = DateTimeField(default=_now)
        expires_at = DateTimeField(null=True)
        last_seen = DateTimeField(null=True)
        revoked = BooleanField(default=False)
        rpm_limit = IntegerField(default=50)
        tpm_limit = IntegerField(default=50000)
        external_id = CharField(max_length=127, null=True, unique=True)
        source = CharField(max_length=15, default="manual")

        class Meta:
            table_name = "api_keys"

    class Provider(Base):
        name = CharField(max_length=63)
        type = CharField(max_length=31, default="openai")
        base_url = CharField(max_length=255)
        api_key = CharField(max_length=255, null=True)
        api_version = CharField(max_length=31, null=True)
        comment = TextField(null=True)
        stream_usage = BooleanField(default=True)
        created_at = DateTimeField(default=_now)
        updated_at = DateTimeField(default=_now)
        deleted = BooleanField(default=False)

        class Meta:
            table_name = "providers"

    class ModelRow(Base):
        provider = ForeignKeyField(Provider, column_name="provider_id")
        system_name = CharField(max_length=63)
        remote_id = CharField(max_length=127, null=True)
        model_type = CharField(max_length=15, default="chat")
        context_length = IntegerField(null=True)
        input_price = FloatField(null=True)
        output_price = FloatField(null=True)
        weight = FloatField(default=1.0)
        comment = TextField(null=True)
        created_at = DateTimeField(default=_now)
        updated_at = DateTimeField(default=_now)
        deleted = BooleanField(default=False)

        class Meta:
            table_name = "models"
            indexes = ((("provider", "system_name"), True),)

    class Completion(Base):
        uid = CharField(max_length=32, unique=True)
        api_key = ForeignKeyField(ApiKey, column_name="api_key_id")
        model_id = IntegerField(null=True)
        provider_id = IntegerField(null=True)
        model = CharField(max_length=255)
        api_format = CharField(max_length=31)
        stream = BooleanField(default=False)
        prompt = JSONField(null=True)
        completion = JSONField(null=True)
        prompt_tokens = IntegerField(null=True)
        completion_tokens = IntegerField(null=True)
        usage = JSONField(null=True)
        status = CharField(max_length=15, default="pending")
        ttft = IntegerField(null=True)
        duration = IntegerField(null=True)
        error = TextField(null=True)
        attempts = JSONField(null=True)
        req_id = CharField(max_length=127, null=True)
        source_completion_id = IntegerField(null=True)
        cached_response = JSONField(null=True)
        swept = BooleanField(default=False)
        rating = FloatField(null=True)
        created_at = DateTimeField(default=_now, index=True)
        updated_at = DateTimeField(default=_now)
        deleted = BooleanField(default=False)

        class Meta:
            table_name = "completions"

    class Embedding(Base):
        uid = CharField(max_length=32, unique=True)
        api_key = ForeignKeyField(ApiKey, column_name="api_key_id")
        model_id = IntegerField(null=True)
        provider_id = IntegerField(null=True)
        model = CharField(max_length=255)
        input = JSONField(null=True)
        input_tokens = IntegerField(null=True)
        embedding = JSONField(null=True)
        dimensions = IntegerField(null=True)
        status = CharField(max_length=15, default="pending")
        duration = IntegerField(null=True)
        error = TextField(null=True)
        attempts = JSONField(null=True)
        swept = BooleanField(default=False)
        created_at = DateTimeField(default=_now, index=True)
        updated_at = DateTimeField(default=_now)
        deleted = BooleanField(default=False)

        class Meta:
            table_name = "embeddings"

    class SrvLog(Base):
        related_api_key_id = IntegerField(null=True)
        related_upstream_id = IntegerField(null=True)
        related_completion_id = IntegerField(null=True)
        message = TextField()
        level = CharField(max_length=15, default="unspecific")
        details = JSONField(null=True)
        created_at = DateTimeField(default=_now)
        acknowledged = BooleanField(default=False)
        ack_at = DateTimeField(null=True)

        class Meta:
            table_name = "srv_logs"

    class Setting(Base):
        key = CharField(max_length=63, unique=True)
        value = JSONField(null=True)
        updated_at = DateTimeField(default=_now)

        class Meta:
            table_name = "settings"

    # A provider name is unique among live providers; a deleted name can be reused.
    # (Raw SQL: index DDL inlines literals, and booleans are 0/1 in SQLite.)
    Provider.add_index(Provider.name, unique=True, where=SQL("NOT deleted"))
    # Request-id dedup is scoped per key.
    Completion.add_index(
        Completion.api_key, Completion.req_id, unique=True, where=Completion.req_id.is_null(False)
    )
    Completion.add_index(Completion.status, Completion.created_at)
    Completion.add_index(Completion.api_key, Completion.created_at)
    Completion.add_index(Completion.model, Completion.created_at)
    Embedding.add_index(Embedding.status, Embedding.created_at)
    Embedding.add_index(Embedding.api_key, Embedding.created_at)
    SrvLog.add_index(SrvLog.related_completion_id)

    db.create_tables([ApiKey, Provider, ModelRow, Completion, Embedding, SrvLog, Setting])
