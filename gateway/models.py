"""The tables, as NexusGate names them, and small query helpers.

Timestamps are naive UTC. Token counts the upstream did not report are NULL
(unknown), never 0. Gateway keys are stored only as a SHA-256 hash plus a short
hint for display. Schema changes go through numbered files in ``migrations/``;
these classes describe the current schema and must match the latest migration.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

import peewee as pw

from gateway.db import database
from gateway.vault import vault

STATUSES = ("pending", "completed", "failed", "aborted", "cache_hit")
MODEL_TYPES = ("chat", "embedding")


def utcnow() -> datetime:
    """Naive UTC now, the one clock every row uses."""
    return datetime.now(UTC).replace(tzinfo=None)


class SealedField(pw.TextField):
    """Text encrypted at rest (``vault``): sealed on the way in, opened on the way out."""

    def db_value(self, value: str | None) -> str | None:
        return None if value is None else vault.seal(value)

    def python_value(self, value: str | None) -> str | None:
        return None if value is None else vault.open(value)


class BaseModel(pw.Model):
    class Meta:
        database = database
        legacy_table_names = False


class ApiKey(BaseModel):
    key_hash = pw.CharField(max_length=64, unique=True)
    key_hint = pw.CharField(max_length=32)
    comment = pw.TextField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField(null=True)
    last_seen = pw.DateTimeField(null=True)
    revoked = pw.BooleanField(default=False)
    rpm_limit = pw.IntegerField(default=50)
    tpm_limit = pw.IntegerField(default=50000)
    external_id = pw.CharField(max_length=127, null=True, unique=True)
    source = pw.CharField(max_length=15, default="manual")
    budget_usd = pw.FloatField(null=True)  # spend allowed per calendar month (UTC)

    class Meta:
        table_name = "api_keys"

    @staticmethod
    def generate() -> str:
        """A new key: ``sk-`` and 32 hex digits."""
        return "sk-" + secrets.token_hex(16)

    @staticmethod
    def hash(key: str) -> str:
        """The stored form of a key."""
        return hashlib.sha256(key.encode()).hexdigest()

    @staticmethod
    def hint(key: str) -> str:
        """What may be shown of a key: its start and its last four characters."""
        return f"{key[:7]}…{key[-4:]}"

    @classmethod
    def issue(cls, **fields: object) -> tuple[ApiKey, str]:
        """Create a key row; return it and the key, whose plaintext is not kept."""
        key = cls.generate()
        return cls.create(key_hash=cls.hash(key), key_hint=cls.hint(key), **fields), key

    @classmethod
    def by_key(cls, key: str) -> ApiKey | None:
        """The row for a plaintext key, revoked or not."""
        return cls.get_or_none(cls.key_hash == cls.hash(key))

    def is_usable(self, now: datetime | None = None) -> bool:
        """Not revoked and not expired."""
        now = now or utcnow()
        return not self.revoked and (self.expires_at is None or self.expires_at > now)


class Provider(BaseModel):
    name = pw.CharField(max_length=63)
    type = pw.CharField(max_length=31, default="openai")
    base_url = pw.CharField(max_length=255)
    api_key = SealedField(null=True)  # text since migration 0003: a sealed key is longer
    api_version = pw.CharField(max_length=31, null=True)
    comment = pw.TextField(null=True)
    # Ask OpenAI-format upstreams for stream usage; some old servers reject the field.
    stream_usage = pw.BooleanField(default=True)
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)
    deleted = pw.BooleanField(default=False)

    class Meta:
        table_name = "providers"

    @classmethod
    def active(cls) -> pw.ModelSelect:
        """Providers not soft-deleted."""
        return cls.select().where(cls.deleted == False)  # noqa: E712


class Model(BaseModel):
    provider = pw.ForeignKeyField(Provider, backref="models", column_name="provider_id")
    system_name = pw.CharField(max_length=63)
    remote_id = pw.CharField(max_length=127, null=True)
    model_type = pw.CharField(max_length=15, default="chat")
    context_length = pw.IntegerField(null=True)
    input_price = pw.FloatField(null=True)  # USD per million tokens
    output_price = pw.FloatField(null=True)
    cache_read_price = pw.FloatField(null=True)  # None: the input price (pricing.py)
    cache_write_price = pw.FloatField(null=True)
    weight = pw.FloatField(default=1.0)
    comment = pw.TextField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)
    deleted = pw.BooleanField(default=False)

    class Meta:
        table_name = "models"
        indexes = ((("provider", "system_name"), True),)

    @classmethod
    def active(cls) -> pw.ModelSelect:
        """Models not soft-deleted whose provider is not soft-deleted either."""
        return (
            cls.select(cls, Provider)
            .join(Provider)
            .where((cls.deleted == False) & (Provider.deleted == False))  # noqa: E712
        )


class Completion(BaseModel):
    uid = pw.CharField(max_length=32, unique=True)
    api_key = pw.ForeignKeyField(ApiKey, column_name="api_key_id", lazy_load=False)
    model_id = pw.IntegerField(null=True)
    provider_id = pw.IntegerField(null=True)
    model = pw.CharField(max_length=255)
    api_format = pw.CharField(max_length=31)
    stream = pw.BooleanField(default=False)
    prompt = pw.JSONField(null=True)
    completion = pw.JSONField(null=True)
    prompt_tokens = pw.IntegerField(null=True)
    completion_tokens = pw.IntegerField(null=True)
    usage = pw.JSONField(null=True)
    status = pw.CharField(max_length=15, default="pending")
    ttft = pw.IntegerField(null=True)  # ms from request to first token
    duration = pw.IntegerField(null=True)  # ms from request to the upstream's end
    error = pw.TextField(null=True)
    attempts = pw.JSONField(null=True)
    req_id = pw.CharField(max_length=127, null=True)
    upstream_id = pw.CharField(max_length=255, null=True)  # the provider's response id
    cost = pw.JSONField(null=True)  # pricing.cost at finalisation, never recomputed
    cost_nanos = pw.BigIntegerField(null=True)  # its total in nano-USD, for sums
    delivered = pw.JSONField(null=True)  # streams: {events, text} the client was sent
    source_completion_id = pw.IntegerField(null=True)
    cached_response = pw.JSONField(null=True)
    swept = pw.BooleanField(default=False)  # finalised by the sweeper, not the call
    rating = pw.FloatField(null=True)
    created_at = pw.DateTimeField(default=utcnow, index=True)
    updated_at = pw.DateTimeField(default=utcnow)
    deleted = pw.BooleanField(default=False)

    class Meta:
        table_name = "completions"
        indexes = (
            (("status", "created_at"), False),
            (("api_key", "created_at"), False),
            (("model", "created_at"), False),
        )


class Embedding(BaseModel):
    uid = pw.CharField(max_length=32, unique=True)
    api_key = pw.ForeignKeyField(ApiKey, column_name="api_key_id", lazy_load=False)
    model_id = pw.IntegerField(null=True)
    provider_id = pw.IntegerField(null=True)
    model = pw.CharField(max_length=255)
    input = pw.JSONField(null=True)
    input_tokens = pw.IntegerField(null=True)
    embedding = pw.JSONField(null=True)
    dimensions = pw.IntegerField(null=True)
    status = pw.CharField(max_length=15, default="pending")
    duration = pw.IntegerField(null=True)
    error = pw.TextField(null=True)
    attempts = pw.JSONField(null=True)
    cost = pw.JSONField(null=True)
    cost_nanos = pw.BigIntegerField(null=True)
    swept = pw.BooleanField(default=False)
    created_at = pw.DateTimeField(default=utcnow, index=True)
    updated_at = pw.DateTimeField(default=utcnow)
    deleted = pw.BooleanField(default=False)

    class Meta:
        table_name = "embeddings"
        indexes = ((("status", "created_at"), False), (("api_key", "created_at"), False))


class SrvLog(BaseModel):
    related_api_key_id = pw.IntegerField(null=True)
    related_upstream_id = pw.IntegerField(null=True)
    related_completion_id = pw.IntegerField(null=True)
    message = pw.TextField()
    level = pw.CharField(max_length=15, default="unspecific")
    details = pw.JSONField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    acknowledged = pw.BooleanField(default=False)
    ack_at = pw.DateTimeField(null=True)

    class Meta:
        table_name = "srv_logs"
        indexes = ((("related_completion_id",), False),)


class Setting(BaseModel):
    key = pw.CharField(max_length=63, unique=True)
    value = pw.JSONField(null=True)
    updated_at = pw.DateTimeField(default=utcnow)

    class Meta:
        table_name = "settings"

    @classmethod
    def read(cls, key: str, default: object = None) -> object:
        """A setting's value, or ``default``."""
        row = cls.get_or_none(cls.key == key)
        return default if row is None else row.value

    @classmethod
    def write(cls, key: str, value: object) -> None:
        """Insert or replace a setting."""
        (
            cls.insert(key=key, value=value, updated_at=utcnow())
            .on_conflict(
                conflict_target=[cls.key], update={cls.value: value, cls.updated_at: utcnow()}
            )
            .execute()
        )


class DashboardSession(BaseModel):
    """A signed-in dashboard session: the cookie holds its token, the table its hash."""

    token_hash = pw.CharField(max_length=64, unique=True)
    created_at = pw.DateTimeField(default=utcnow)

    class Meta:
        table_name = "dashboard_sessions"

    @classmethod
    def open(cls, lifetime: timedelta) -> str:
        """Start a session; return its token. Sessions older than ``lifetime`` go."""
        cls.delete().where(cls.created_at < utcnow() - lifetime).execute()
        token = secrets.token_urlsafe(32)
        cls.create(token_hash=hashlib.sha256(token.encode()).hexdigest())
        return token

    @classmethod
    def alive(cls, token: object, lifetime: timedelta) -> bool:
        """True while the session of ``token`` is open and younger than ``lifetime``."""
        if not isinstance(token, str):
            return False
        digest = hashlib.sha256(token.encode()).hexdigest()
        since = utcnow() - lifetime
        return cls.select().where((cls.token_hash == digest) & (cls.created_at > since)).exists()

    @classmethod
    def close(cls, token: object) -> None:
        """End the session of ``token``: its cookie is worthless from now on."""
        if isinstance(token, str):
            digest = hashlib.sha256(token.encode()).hexdigest()
            cls.delete().where(cls.token_hash == digest).execute()


# Partial indexes (as in migrations/0001): live provider names are unique; a request
# id is unique per key.
Provider.add_index(Provider.name, unique=True, where=pw.SQL("NOT deleted"))
Completion.add_index(
    Completion.api_key, Completion.req_id, unique=True, where=Completion.req_id.is_null(False)
)

ALL_MODELS = (ApiKey, Provider, Model, Completion, Embedding, SrvLog, Setting)
