"""The statements that write call records: the recorder's upsert, the sweeper's
finalisation, and on SQLite the full-text index's lots.

Call records are written only here: ``upsert_records`` (the recorder's one statement,
``recorder.write_rows``) and ``finalise_orphans`` (the sweeper's); ``retention.py``
alone deletes them or empties their bodies. A pending snapshot never overwrites a final
row, and a final one overwrites only a pending row or one the sweeper finalised, so
snapshots may arrive late, twice or out of order. On SQLite a final call's text is left
due (``completions_fts_due``, ``migrations/0014``) and ``index_due`` moves it into the
index in lots; everyone else's writes are indexed by the triggers (``0006``, ``0010``).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import gevent
import peewee as pw

from gateway import fulltext, jsoncodec
from gateway.db import database, is_postgres, sqlite_write
from gateway.models import RECORD_TABLES, ApiKey, BaseModel, Completion, utcnow

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
