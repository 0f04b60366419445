"""The tables, as NexusGate names them, and small query helpers.

Timestamps are naive UTC. Token counts the upstream did not report are NULL
(unknown), never 0. Gateway keys are stored only as a SHA-256 hash plus a short
hint for display; every change to a key row must bump its ``updated_at`` (each
worker re-reads changed keys by it). Call records are written only by ``writes.py``
(the recorder's upsert and the sweeper's finalisation); old ones are deleted, or their
bodies emptied, only by ``retention.py`` (which otherwise only moves rows the DEFAULT
partition caught into their month's partition, ``partitions.py``). Schema changes go
through numbered files in ``migrations/``; these classes describe the current schema
and must match the latest migration, except for the full-text index (``0006_search``),
which the database keeps: ``completions.search`` (PostgreSQL), and ``completions_fts``
(SQLite), which triggers fill except for the rows the upsert gives it itself, in lots
(``0010``, ``0014``: ``writes.py``); and the monthly partitions of ``completions`` on
PostgreSQL (``0007_partitions``), whose unique indexes include ``created_at``.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

import peewee as pw

from gateway import redact
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
    max_concurrent = pw.IntegerField(null=True)  # calls in flight at once; None: unlimited
    external_id = pw.CharField(max_length=127, null=True, unique=True)
    source = pw.CharField(max_length=15, default="manual")
    budget_usd = pw.DoubleField(null=True)  # spend allowed per calendar month (UTC)

    class Meta:
        table_name = "api_keys"
        indexes = ((("updated_at",), False),)

    @staticmethod
    def generate() -> str:
        """A new key: ``sk-`` and 32 hex digits."""
        return "sk-" + secrets.token_hex(16)

    @staticmethod
    def hash(key: str) -> str:
        """The stored form of a key."""
        return hashlib.sha256(key.encode()).hexdigest()

    @classmethod
    def issue(cls, **fields: object) -> tuple[ApiKey, str]:
        """Create a key row; return it and the key, whose plaintext is not kept."""
        key = cls.generate()
        return cls.create(key_hash=cls.hash(key), key_hint=redact.hint(key), **fields), key

    @classmethod
    def by_key(cls, key: str) -> ApiKey | None:
        """The row for a plaintext key, revoked or not."""
        return cls.get_or_none(cls.key_hash == cls.hash(key))

    @classmethod
    def changed_since(cls, since: datetime | None) -> pw.ModelSelect:
        """Keys changed after ``since`` (revoked ones included); every live key if None."""
        query = cls.select(
            cls.id,
            cls.key_hash,
            cls.rpm_limit,
            cls.tpm_limit,
            cls.revoked,
            cls.expires_at,
            cls.budget_usd,
            cls.max_concurrent,
            cls.comment,
            cls.updated_at,
        )
        if since is None:
            return query.where(cls.revoked == False)  # noqa: E712
        return query.where(cls.updated_at > since)


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
    input_price = pw.DoubleField(null=True)  # USD per million tokens
    output_price = pw.DoubleField(null=True)
    cache_read_price = pw.DoubleField(null=True)  # None: the input price (pricing.py)
    cache_write_price = pw.DoubleField(null=True)
    weight = pw.DoubleField(default=1.0)
    comment = pw.TextField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)
    deleted = pw.BooleanField(default=False)

    class Meta:
        table_name = "models"
        # (provider, system_name) is unique among live models only (migrations/0017).

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
    # (api_key, created_at) below serves lookups by key alone (migrations/0015)
    api_key = pw.ForeignKeyField(ApiKey, column_name="api_key_id", lazy_load=False, index=False)
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
    response_model = pw.CharField(max_length=255, null=True)  # the model the provider named
    stop_reason = pw.CharField(max_length=31, null=True)  # the answer's, in IR terms (0008)
    cost = pw.JSONField(null=True)  # pricing.cost at finalisation, never recomputed
    cost_nanos = pw.BigIntegerField(null=True)  # its total in nano-USD, for sums
    delivered = pw.JSONField(null=True)  # streams: {events, text} the client was sent
    source_completion_id = pw.IntegerField(null=True)
    source_uid = pw.CharField(max_length=32, null=True)  # a cache_hit's source (_replay_links)
    cached_response = pw.JSONField(null=True)
    owner = pw.CharField(max_length=96, null=True)  # the process that recorded it (sweeper.py)
    swept = pw.BooleanField(default=False)  # finalised by the sweeper, not the call
    swept_at = pw.DateTimeField(null=True)  # when it was swept (kept after the call's own state)
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
    # (api_key, created_at) below serves lookups by key alone (migrations/0015)
    api_key = pw.ForeignKeyField(ApiKey, column_name="api_key_id", lazy_load=False, index=False)
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
    owner = pw.CharField(max_length=96, null=True)
    swept = pw.BooleanField(default=False)
    swept_at = pw.DateTimeField(null=True)
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
        indexes = ((("related_completion_id",), False), (("created_at",), False))


class RetiredSpend(BaseModel):
    """What a key's records that retention deleted had cost in one budget month (UTC,
    ``YYYY-MM``), in nano-USD: a budget still counts it (``ledger.month_spend``)."""

    api_key_id = pw.IntegerField()
    month = pw.CharField(max_length=7)
    nanos = pw.BigIntegerField()

    class Meta:
        table_name = "retired_spend"
        primary_key = pw.CompositeKey("api_key_id", "month")

    @classmethod
    def added(cls, nanos_by_key: dict[int, int], month: str) -> list[pw.Query]:
        """The statements adding ``nanos_by_key`` to the keys' spend retired in ``month``."""
        return [
            cls.insert(api_key_id=key_id, month=month, nanos=nanos).on_conflict(
                conflict_target=[cls.api_key_id, cls.month],
                update={cls.nanos: cls.nanos + pw.EXCLUDED.nanos},
            )
            for key_id, nanos in sorted(nanos_by_key.items())
            if nanos
        ]


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


class Heartbeat(BaseModel):
    """One row per running gateway process, rewritten every ``PROCESS_HEARTBEAT`` s."""

    owner = pw.CharField(max_length=96, unique=True)
    host = pw.CharField(max_length=255)
    pid = pw.IntegerField()
    started_at = pw.DateTimeField(default=utcnow)
    beat_at = pw.DateTimeField(default=utcnow)

    class Meta:
        table_name = "heartbeats"

    @classmethod
    def beat(cls, owner: str, host: str, pid: int) -> None:
        """Insert or refresh this process's row."""
        now = utcnow()
        cls.insert(owner=owner, host=host, pid=pid, started_at=now, beat_at=now).on_conflict(
            conflict_target=[cls.owner], update={cls.beat_at: now}
        ).execute()


class RateLimit(BaseModel):
    """A per-model limit (``/api/admin/ratelimits``): a bucket of ``limit`` calls per key,
    refilled at ``refill`` per second, for calls naming ``identifier`` (model_limits.py)."""

    identifier = pw.CharField(max_length=255, unique=True)
    limit = pw.IntegerField()
    refill = pw.DoubleField()
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)

    class Meta:
        table_name = "rate_limits"


# Partial indexes (as in migrations/0001 and 0004): live provider names are unique; a
# request id is looked up per key (not unique: a failed call's id is retried, and without
# Redis two workers may run one id at once); replays are found by their source's uid.
Provider.add_index(Provider.name, unique=True, where=pw.SQL("NOT deleted"))
Completion.add_index(Completion.api_key, Completion.req_id, where=Completion.req_id.is_null(False))
Completion.add_index(Completion.source_uid, where=Completion.source_uid.is_null(False))

RECORD_TABLES: dict[str, type[BaseModel]] = {"completion": Completion, "embedding": Embedding}
