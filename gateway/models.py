"""The tables, as NexusGate names them, small query helpers, and the record writes.

Timestamps are naive UTC. Token counts the upstream did not report are NULL
(unknown), never 0. Gateway keys are stored only as a SHA-256 hash plus a short
hint for display; every change to a key row must bump its ``updated_at`` (each
worker re-reads changed keys by it). Call records are written only by
``upsert_records`` (the recorder's one statement) and ``finalise_orphans`` (the
sweeper's); old ones are deleted, or their bodies emptied, only by ``retention.py``
(which otherwise only moves rows the DEFAULT partition caught into their month's
partition, ``partitions.py``). Schema changes go through numbered files in ``migrations/``; these
classes describe the current schema and must match the latest migration, except for
the full-text index (``0006_search``), which the database keeps: ``completions.search``
(PostgreSQL), and ``completions_fts`` (SQLite), which triggers fill except for the rows
the upsert gives it itself, in lots (``0010``, ``0014``: ``_sqlite_upsert``,
``index_due``); and the monthly partitions of ``completions`` on PostgreSQL
(``0007_partitions``), whose unique indexes include ``created_at``.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import weakref
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import gevent
import peewee as pw

from gateway import fulltext, jsoncodec, redact
from gateway.db import database, is_postgres, sqlite_write
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


# -- the writes of call records ---------------------------------------------------


ROWS_PER_STATEMENT = 25  # rows encoded and sent at once: well under 1 ms of a worker's CPU


def upsert_records(rows: list[dict], touch: dict[int, datetime] | None = None) -> list[dict]:
    """Upsert snapshots by uid, link replays to their sources and move keys' ``last_seen``
    forward (``touch``: key id -> its calls' latest time), in one transaction on the
    caller's connection; on SQLite, ``sqlite_write``'s (the lock waited for in gevent,
    SQLite's work beside the loop).

    Each row names its table (``kind``: completion or embedding). A pending snapshot
    never overwrites a final row; a final one overwrites only a pending row or one
    the sweeper finalised (the process was alive after all), so stale and repeated
    snapshots, in any order, change nothing.

    Returns the snapshots the database took, as the statement itself reports them
    (``RETURNING``): each with its row's ``id`` and ``swept_at``, which is set only on
    a final row that replaced the sweeper's (the sweeper's own rows keep ``swept``).
    A snapshot the rules above refused is not among them.
    """
    # One snapshot per call: a replayed journal may hold a call's pending and final
    # snapshots, and an upsert statement may not touch one row twice.
    latest: dict[str, dict] = {}
    for row in rows:
        held = latest.get(row["uid"])
        if held is None or row["status"] != "pending" or held["status"] == "pending":
            latest[row["uid"]] = row
    # On SQLite a completion's final text goes to the index from here, where its
    # messages are in hand (``_indexed``); rows whose text it cannot say, the triggers
    # index (``migrations/0010``).
    bodies: dict[str, str] = {}
    groups: dict[tuple, list[dict]] = {}
    for row in latest.values():
        # Every column but ``kind``, which the recorder puts first; a journal of an
        # older version may hold other columns, or put it elsewhere.
        columns = tuple(row)
        columns = (
            columns[1:] if columns[:1] == ("kind",) else tuple(c for c in columns if c != "kind")
        )
        table = RECORD_TABLES[row["kind"]]
        # A snapshot without its text (an older journal's) leaves the stored text as is.
        here = table is Completion and row["status"] != "pending" and not is_postgres()
        here = here and "prompt" in row and "completion" in row
        if here and (text := fulltext.body(row["prompt"], row["completion"])) is not None:
            bodies[row["uid"]] = text
        groups.setdefault((table, columns, row["uid"] in bodies), []).append(row)
    # In lots: on PostgreSQL, while one is with the database, the worker's calls run.
    lots = [
        (_upsert(table, columns), group[start : start + ROWS_PER_STATEMENT], here)
        for (table, columns, here), group in groups.items()
        for start in range(0, len(group), ROWS_PER_STATEMENT)
    ]
    later = [*_replay_links(latest.values()), *_last_seen_updates(touch or {})]
    if is_postgres():
        with database.atomic():
            returned = [statement.execute(lot) for statement, lot, _ in lots]
            for query in later:
                query.execute()
    else:
        returned = _sqlite_upsert(lots, bodies, [q.sql() for q in later])
    return [
        {**latest[uid], "id": row_id, "swept_at": swept_at}
        for lot in returned
        for uid, row_id, swept_at in lot
    ]


# The recorder's flag for the full-text triggers (``migrations/0010``): up, they leave
# the rows to it.
_INDEXING = "UPDATE completions_fts_writer SET indexing = ?"
# What ``index_due`` moves into the index in one transaction at most: rows, and
# characters of text past the first row (about half a second of SQLite's work).
INDEX_LOT, INDEX_CHARS = 2000, 2_000_000
_LAST_DUE = "SELECT max(id) FROM completions_fts_due"


def _sqlite_upsert(
    lots: list[tuple[_Upsert, list[dict], bool]], bodies: dict[str, str], later: list[tuple]
) -> list[list[tuple[str, int, datetime | None]]]:
    """The lots in one ``sqlite_write`` transaction, then ``later``: first those whose
    text ``bodies`` holds, with the triggers' flag up and their text put in
    ``completions_fts_due`` after them (``index_due`` indexes it), then the flag down
    and the rest. Returns what each lot's statement gave back."""
    ordered = sorted(lots, key=lambda lot: not lot[2])
    items: list[Any] = []
    at: list[int] = []  # where each lot's statement is among the items
    for i, (statement, lot, here) in enumerate(ordered):
        if here and i == 0:
            items.append((_INDEXING, [1]))
        at.append(len(items))
        items.append(statement.sqlite(lot))
        gevent.sleep(0)  # a lot's values are encoded here, on the loop: the calls' turn
        if here and (i + 1 == len(ordered) or not ordered[i + 1][2]):
            items.append(functools.partial(_due, bodies, list(at)))
            items.append((_INDEXING, [0]))
    results = sqlite_write(items + later)
    return [s.read_back(results[j]) for (s, _, _), j in zip(ordered, at, strict=True)]


def _due(
    bodies: dict[str, str], at: list[int], results: list[list[tuple]]
) -> list[tuple[str, list]]:
    """The text due to the index of the final rows the statements at ``at`` wrote
    (their ids came back from the write: a snapshot the upsert refused changes
    nothing), in place of any due before. Run in the write."""
    rows = [(row_id, bodies[uid]) for j in at for uid, row_id, _ in results[j] if uid in bodies]
    if not rows:
        return []
    values = ", ".join(["(?, ?)"] * len(rows))
    sql = f"INSERT OR REPLACE INTO completions_fts_due (id, body) VALUES {values}"
    return [(sql, [value for row in rows for value in row])]


def index_due(limit: int = INDEX_LOT, up_to: int | None = None) -> int:
    """SQLite: move the text of the rows due first (ids up to ``up_to``, if given) from
    ``completions_fts_due`` into the full-text index, each in place of what it held for
    that row, in one transaction beside the loop: at most ``limit`` rows and, past the
    first, ``INDEX_CHARS`` characters. Returns the number moved. Any process's rows:
    one that died left its own here. PostgreSQL: nothing is ever due (0).

    FTS5 makes a segment of each transaction's terms, so a lot costs far less a row
    than the recorder's few rows a write did (``migrations/0014``)."""
    if is_postgres():
        return 0
    moved = 0

    def move(results: list[list[tuple]]) -> list[tuple[str, list]]:
        nonlocal moved
        last, size = None, 0
        for row_id, length in results[0]:
            size += length
            if last is not None and size > INDEX_CHARS:
                break
            last, moved = row_id, moved + 1
        if last is None:
            return []
        return [
            (
                "INSERT OR REPLACE INTO completions_fts (rowid, body)"
                " SELECT id, body FROM completions_fts_due WHERE id <= ?",
                [last],
            ),
            ("DELETE FROM completions_fts_due WHERE id <= ?", [last]),
        ]

    lot = "SELECT id, length(body) FROM completions_fts_due WHERE id <= ? ORDER BY id LIMIT ?"
    sqlite_write([(lot, [2**63 - 1 if up_to is None else up_to, limit]), move])
    return moved


def index_all_due() -> None:
    """SQLite: everything due now reaches the index, so that a search finds every call
    recorded so far (``index_due``, lot after lot, up to the last row due now: rows
    that fall due meanwhile wait for the next time). With nothing due it only reads:
    no write lock taken for a search that finds the index up to date."""
    if is_postgres():
        return
    (last,) = database.execute_sql(_LAST_DUE).fetchone()
    while last is not None and index_due(up_to=last):
        pass


def _replay_links(rows: Iterable[dict]) -> list[pw.Query]:
    """The update that points cache_hit rows at their source's id, whichever of the two
    was written first, if ``rows`` hold either.

    The recorder writes a replay and its source in any order (two workers, or a journal
    replayed later): the replay names its source by uid, and this fills in the id once
    both rows exist. Run inside the recorder's write, after the rows of ``rows``.
    """
    rows = list(rows)
    replays = [r["uid"] for r in rows if r.get("source_uid")]
    sources = [r["uid"] for r in rows if r.get("req_id") and not r.get("source_uid")]
    if not replays and not sources:
        return []
    source = Completion.alias()
    return [
        Completion.update(
            source_completion_id=source.select(source.id).where(source.uid == Completion.source_uid)
        ).where(
            Completion.source_completion_id.is_null()
            & (Completion.uid.in_(replays) | Completion.source_uid.in_(sources))
        )
    ]


def _last_seen_updates(seen: dict[int, datetime]) -> list[pw.Query]:
    """Updates that move each key's ``last_seen`` forward to the time given (never back)."""
    return [
        ApiKey.update(last_seen=when).where(
            (ApiKey.id == key_id) & (ApiKey.last_seen.is_null() | (ApiKey.last_seen < when))
        )
        for key_id, when in sorted(seen.items())
    ]


def pending_owners() -> set[str]:
    """Owners of rows still pending."""
    owners: set[str] = set()
    for table in RECORD_TABLES.values():
        query = table.select(table.owner).distinct().where(table.status == "pending")
        owners.update(owner for (owner,) in query.tuples() if owner)
    return owners


def finalise_orphans(owners: Iterable[str], before: datetime | None, error: str) -> int:
    """Fail the pending rows of dead ``owners`` and ownerless ones older than ``before``."""
    return len(finalise_orphan_rows(owners, before, error))


def finalise_orphan_rows(owners: Iterable[str], before: datetime | None, error: str) -> list[dict]:
    """``finalise_orphans``, returning the rows it finalised (with their ``kind``) as
    they now stand: exactly those this statement changed, for their spans (telemetry)."""
    owners = list(owners)
    finalised: list[dict] = []
    for kind, table in RECORD_TABLES.items():
        orphaned = table.owner.in_(owners) if owners else None
        if before is not None:
            old = table.owner.is_null() & (table.updated_at < before)
            orphaned = old if orphaned is None else orphaned | old
        if orphaned is None:
            continue
        now = utcnow()
        query = (
            table.update(status="failed", error=error, swept=True, swept_at=now, updated_at=now)
            .where((table.status == "pending") & orphaned)
            .returning(*table._meta.sorted_fields)
            .dicts()
        )
        finalised.extend({"kind": kind, **row} for row in query.execute())
    return finalised


class _Upsert:
    """A table's upsert statement, built once per database and column set.

    On PostgreSQL a lot of rows is one statement with one parameter, the rows as a JSON
    array that the server reads as the table's row type (``jsonb_populate_recordset``):
    the statement is the same whatever the lot's size, so it is parsed and planned once
    per connection, and the worker encodes one JSON text. A statement per row costs the
    database and the worker several times more per row. SQLite takes a lot as one
    statement of as many ``VALUES`` rows (one text per lot size, kept).
    """

    def __init__(self, table: type[BaseModel], columns: tuple[str, ...]) -> None:
        db = database.obj
        meta = table._meta
        # Every column: peewee's defaults live in Python, not in the schema.
        self.fields = [f for f in meta.sorted_fields if not isinstance(f, pw.AutoField)]
        # Per column, looked up once: where a row's value comes from, how it is stored.
        self._plan = [
            (
                f.name,
                f.column_name,
                f.name in columns,
                f.default,
                isinstance(f, pw.JSONField),
                f.db_value,
            )
            for f in self.fields
        ]
        quote = db.quote[0]

        def name(field: pw.Field | str) -> str:
            return f"{quote}{field if isinstance(field, str) else field.column_name}{quote}"

        updated = [
            f
            for f in self.fields
            if (f.name in columns and f.name not in ("uid", "created_at")) or f.name == "swept"
        ]
        table_name = name(meta.table_name)
        names = ", ".join(name(f) for f in self.fields)
        upsert = (
            f" ON CONFLICT ({', '.join(name(f) for f in _conflict_target(table))}) DO UPDATE SET "
            + ", ".join(f"{name(f)} = EXCLUDED.{name(f)}" for f in updated)
            + f" WHERE {table_name}.{name('status')} = {db.param}"
            f" OR ({table_name}.{name('swept')} = {db.param}"
            f" AND EXCLUDED.{name('status')} <> {db.param})"
        )
        # What the row is now, for its span: read back in the same statement.
        upsert += f" RETURNING {name('uid')}, {name('id')}, {name('swept_at')}"
        self._swept_at = meta.fields["swept_at"]
        self._constants = ("pending", True, "pending")
        self._lots = isinstance(db, pw.PostgresqlDatabase)
        if self._lots:
            self.sql = (
                f"INSERT INTO {table_name} ({names}) SELECT {names}"
                f" FROM jsonb_populate_recordset(NULL::{table_name}, {db.param}::jsonb)" + upsert
            )
        else:
            self.sql = f"INSERT INTO {table_name} ({names}) VALUES {{rows}}" + upsert
            self._row = f"({', '.join([db.param] * len(self.fields))})"
            self._by_size: dict[int, str] = {}

    def execute(self, rows: list[dict]) -> list[tuple[str, int, datetime | None]]:
        """PostgreSQL: upsert ``rows`` (one per uid) on the current connection; (uid, id,
        swept_at) of each row written."""
        lot = jsoncodec.encode([self._json(row) for row in rows], _isoformat).decode()
        cursor = database.cursor()
        with pw.__exception_wrapper__:  # driver errors -> peewee's classes
            cursor.execute(self.sql, [lot, *self._constants])
            return self.read_back(cursor.fetchall())

    def sqlite(self, rows: list[dict]) -> tuple[str, list[Any]]:
        """SQLite: the statement and parameters that upsert ``rows`` (one per uid). One
        statement, not executemany: sqlite3's drops what RETURNING gives."""
        sql = self._by_size.get(len(rows))
        if sql is None:
            sql = self._by_size[len(rows)] = self.sql.format(
                rows=", ".join([self._row] * len(rows))
            )
        values = [value for row in rows for value in self._values(row)]
        return sql, [*values, *self._constants]

    def read_back(self, written: list[tuple]) -> list[tuple[str, int, datetime | None]]:
        """(uid, id, swept_at) of each row the statement wrote, from what it returned."""
        return [(uid, row_id, self._swept_at.python_value(at)) for uid, row_id, at in written]

    def _json(self, row: dict) -> dict[str, Any]:
        """The row as the JSON object ``jsonb_populate_recordset`` reads (by column name)."""
        out = {}
        for name, column, given, default, is_json, db_value in self._plan:
            value = row[name] if given else default() if callable(default) else default
            if value is not None and not is_json:
                value = db_value(value)  # a JSON column's value goes in as it is
            out[column] = value
        return out

    def _values(self, row: dict) -> list[Any]:
        values = []
        for name, _, given, default, is_json, db_value in self._plan:
            value = row[name] if given else default() if callable(default) else default
            if value is not None:  # SQLite: a JSON column's value as text
                value = jsoncodec.encode(value).decode() if is_json else db_value(value)
            values.append(value)
        return values


def _isoformat(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()  # timestamp columns read ISO 8601
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _conflict_target(table: type[BaseModel]) -> list[pw.Field]:
    """The columns of the unique index a snapshot's upsert lands on.

    On PostgreSQL the completions table is partitioned by ``created_at``
    (``migrations/0007``), and a partitioned table's unique indexes include the
    partition key: ``(uid, created_at)``, which is one call's too, since a call's
    ``created_at`` never changes between its snapshots.
    """
    fields = table._meta.fields
    if table is Completion and isinstance(database.obj, pw.PostgresqlDatabase):
        return [fields["uid"], fields["created_at"]]
    return [fields["uid"]]


# Per database object (not its id(): a new one may reuse a dead one's), then per table
# and column set.
_UPSERTS: weakref.WeakKeyDictionary[pw.Database, dict[tuple, _Upsert]] = weakref.WeakKeyDictionary()


def _upsert(table: type[BaseModel], columns: tuple[str, ...]) -> _Upsert:
    statements = _UPSERTS.setdefault(database.obj, {})
    statement = statements.get((table, columns))
    if statement is None:
        statement = statements[(table, columns)] = _Upsert(table, columns)
    return statement
