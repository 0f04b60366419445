"""The only writer of call records: background writers, a journal, a sweeper.

``record(exchange)`` never blocks and never touches the database: it marks the call
dirty and wakes a writer. A writer takes a batch of dirty calls, snapshots each
(``Exchange.row()``) and upserts the batch by ``uid`` in one short transaction, so a
call that ended before its pending row was written is inserted once, final. A call
is never in two batches at once, so its writes land in order. The upsert only
overwrites a row that is still ``pending`` (or was swept), so a stale pending
snapshot can never undo a final one, whatever order they arrive in.

Writing is kept cheap because it shares the worker with the calls: each table's
upsert statement is built once and run with ``executemany``, writers keep their
connection, a pending snapshot lingers ``RECORDER_LINGER`` seconds (a call that
ends by then is written once, final), and ``api_keys.last_seen`` is touched at
most every 30 s per key.

If the database is unreachable, snapshots go to a journal file (one per process,
fsynced) and a replayer writes them back once it answers (SPEC rule 8). The sweeper
finalises rows left ``pending`` by a process that died (rule 7). ``drain()`` waits
for the queue at shutdown and journals whatever it could not write in time.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import peewee
from flask import Flask
from gevent import monkey

from gateway import metrics
from gateway.config import INSTANCE
from gateway.db import database, is_postgres
from gateway.exchange import COMPLETION, EMBEDDING, Exchange
from gateway.journal import Journal
from gateway.models import ApiKey, Completion, Embedding, link_replays, utcnow

log = logging.getLogger(__name__)

SWEPT_ERROR = "orphaned: the gateway process handling this call ended before it finished"


class Recorder:
    """Writes exchanges in the background; one per worker process."""

    def __init__(self) -> None:
        self._dirty: dict[str, Exchange] = {}
        self._writing: set[str] = set()
        self._wake = gevent.event.Event()
        self._idle = gevent.event.Event()
        self._idle.set()
        self._group = gevent.pool.Group()
        self._journaling = False
        self._started = False
        self.writes = 0  # rows written, for tests and metrics
        self.journaled = 0
        self._waiting = 0  # this worker's records in the journal, for /metrics
        self.linger = 0.25
        self._key_touched: dict[int, float] = {}

    def init_app(self, app: Flask) -> None:
        """Read settings; start writers, the replayer and the sweeper."""
        cfg = app.config
        self.batch_size = int(cfg["RECORDER_BATCH"])
        self.linger = float(cfg["RECORDER_LINGER"])
        writers = cfg["RECORDER_WRITERS"] or (4 if is_postgres() else 1)
        self.journal = Journal(Path(cfg["JOURNAL_DIR"] or INSTANCE / "journal"))
        self.sweep_interval = float(cfg["SWEEP_INTERVAL"])
        # The longest a live call can keep its row pending, plus slack for shutdown.
        after = cfg["SWEEP_AFTER"]
        self.orphan_after = timedelta(
            seconds=float(after if after is not None else cfg["CALL_TIMEOUT"] + 120)
        )
        # Only a gevent server (a worker, or the test process) writes in the
        # background; a CLI command builds the app without needing the greenlets.
        if self._started or not monkey.is_module_patched("socket"):
            return
        self._started = True
        for _ in range(int(writers)):
            self._spawn(self._write_loop)
        self._spawn(self._replay_loop)
        if self.sweep_interval > 0:
            self._spawn(self._sweep_loop)

    # -- the public face ------------------------------------------------------

    def record(self, exchange: Exchange) -> None:
        """Queue the exchange's current state to be written."""
        self._dirty[exchange.uid] = exchange
        self._idle.clear()
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for everything queued to be written."""
        return self._idle.wait(timeout)

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued is written; journal the rest. True if written."""
        if self._idle.wait(timeout):
            return True
        left = [uid for uid in self._dirty if uid not in self._writing]
        if left:
            self._journal([snapshot(self._dirty.pop(uid)) for uid in left])
        log.warning("recorder: journaled %d records not written in time", len(left))
        self._settle()
        return False

    # -- writing --------------------------------------------------------------

    def _spawn(self, fn: Any) -> None:
        greenlet = self._group.spawn(fn)
        greenlet.link_exception(lambda g: log.error("recorder greenlet died", exc_info=g.exc_info))

    def _write_loop(self) -> None:
        while True:
            batch, due = self._take_batch()
            if not batch:
                # Nothing to write now: what is dirty is lingering or being written by
                # another writer (which rescans before it sleeps). No switch happens
                # between the scan and the clear, so no wake-up is lost.
                self._wake.clear()
                self._settle()
                self._wake.wait(None if due is None else max(0.0, due - time.monotonic()))
                continue
            try:
                rows = [snapshot(ex) for ex in batch]
                if self._journaling:
                    self._journal(rows)
                else:
                    self._write_or_journal(rows)
            finally:
                for ex in batch:
                    self._writing.discard(ex.uid)
                self._settle()

    def _settle(self) -> None:
        if not self._dirty and not self._writing:
            self._idle.set()

    def _take_batch(self) -> tuple[list[Exchange], float | None]:
        """Calls ready to write, and when the next lingering one falls due."""
        batch: list[Exchange] = []
        due: float | None = None
        now = time.monotonic()
        for uid, ex in list(self._dirty.items()):
            if uid in self._writing:
                continue  # its earlier snapshot is being written; keep order
            if not ex.finished and ex.started + self.linger > now:
                due = min(due or float("inf"), ex.started + self.linger)
                continue
            batch.append(self._dirty.pop(uid))
            self._writing.add(uid)
            if len(batch) >= self.batch_size:
                break
        return batch, due

    def _write_or_journal(self, rows: list[dict]) -> None:
        now = time.monotonic()
        keys = {r["api_key"] for r in rows if now - self._key_touched.get(r["api_key"], -1e9) > 30}
        started = time.perf_counter()
        try:
            write_rows(rows, touch_keys=keys)
        except _UNREACHABLE:
            log.exception("recorder: database write failed; journaling %d records", len(rows))
            _reset_connection()
            self._journaling = True
            self._journal(rows)
            return
        except peewee.DatabaseError:
            # The database refused something in the batch: find it, keep the rest.
            _reset_connection()
            self._write_each(rows)
            return
        metrics.recorder_wrote(time.perf_counter() - started)
        self.writes += len(rows)
        self._key_touched.update(dict.fromkeys(keys, now))

    def _write_each(self, rows: list[dict]) -> None:
        """Write rows one by one; journal them if the database goes away, set aside refusals."""
        for row in rows:
            try:
                write_rows([row])
                self.writes += 1
            except _UNREACHABLE:
                _reset_connection()
                self._journaling = True
                self._journal([row])
            except peewee.DatabaseError:
                _reset_connection()
                log.exception("recorder: the database refused record %s; set aside", row["uid"])
                self.journal.append([row], prefix="refused")

    # -- the journal ----------------------------------------------------------

    def _journal(self, rows: list[dict]) -> None:
        self.journal.append(rows)
        self.journaled += len(rows)
        self._waiting += len(rows)
        metrics.journal_depth(self._waiting)

    def _replay_loop(self) -> None:
        while True:
            try:
                self._replay_once()
            except Exception:
                log.exception("recorder: journal replay failed")
            gevent.sleep(5.0 if self._journaling else 30.0)

    def _replay_once(self) -> None:
        """Write back this process's journal and any left by dead processes."""
        try:
            self.journal.replay(self._write_replayed)
        except Exception:
            _reset_connection()
            raise
        # Writers that journaled while we replayed left a new file: keep journaling.
        self._journaling = self.journal.has_own()
        if not self._journaling and self._waiting:
            self._waiting = 0
            metrics.journal_depth(0)

    def _write_replayed(self, rows: list[dict]) -> None:
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            try:
                write_rows(batch)
            except _UNREACHABLE:
                raise  # still away: the journal file is given back
            except peewee.DatabaseError:
                _reset_connection()
                self._write_each(batch)  # a refused row must not block the rest

    # -- the sweeper ----------------------------------------------------------

    def _sweep_loop(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception:
                log.exception("recorder: sweep failed")
            gevent.sleep(self.sweep_interval)

    def sweep(self, now: datetime | None = None) -> int:
        """Finalise rows left pending by a dead process; return how many."""
        cutoff = (now or utcnow()) - self.orphan_after
        count = 0
        with database.connection_context():
            for table in (Completion, Embedding):
                count += (
                    table.update(
                        status="failed", error=SWEPT_ERROR, swept=True, updated_at=utcnow()
                    )
                    .where((table.status == "pending") & (table.updated_at < cutoff))
                    .execute()
                )
        if count:
            log.warning("recorder: swept %d orphaned pending records", count)
        return count


TABLES: dict[str, type[peewee.Model]] = {COMPLETION: Completion, EMBEDDING: Embedding}
# Errors that mean "the database is not there", as opposed to "it refused this row".
_UNREACHABLE = (peewee.OperationalError, peewee.InterfaceError, OSError)


def snapshot(exchange: Exchange) -> dict[str, Any]:
    """The exchange's row as it stands now, tagged with its table."""
    return {"kind": exchange.kind, **exchange.row()}


def write_rows(rows: list[dict], touch_keys: set[int] | None = None) -> None:
    """Upsert snapshots by uid in one transaction; a final row is never overwritten.

    ``touch_keys``: key ids whose ``last_seen`` to update (default: every row's key).
    """
    # One snapshot per call: a replayed journal may hold a call's pending and final
    # snapshots, and an upsert statement may not touch one row twice.
    latest: dict[str, dict] = {}
    for row in rows:
        held = latest.get(row["uid"])
        if held is None or row["status"] != "pending" or held["status"] == "pending":
            latest[row["uid"]] = row
    by_table: dict[type[peewee.Model], list[dict]] = {}
    for row in latest.values():
        by_table.setdefault(TABLES[row["kind"]], []).append(row)
    keys = sorted({row["api_key"] for row in rows} if touch_keys is None else touch_keys)
    if database.is_closed():
        database.connect()  # the writer's own connection, kept between batches
    with database.atomic():
        for table, table_rows in by_table.items():
            statement = _upsert(table, tuple(c for c in table_rows[0] if c != "kind"))
            with peewee.__exception_wrapper__:  # driver errors -> peewee's classes
                database.cursor().executemany(
                    statement.sql, [statement.params(r) for r in table_rows]
                )
        link_replays(latest.values())
        if keys:
            ApiKey.update(last_seen=utcnow()).where(ApiKey.id.in_(keys)).execute()


class _Upsert:
    """A table's upsert statement, built once per database and column set."""

    def __init__(self, table: type[peewee.Model], columns: tuple[str, ...]) -> None:
        db = database.obj
        meta = table._meta
        # Every column: peewee's defaults live in Python, not in the schema.
        self.fields = [f for f in meta.sorted_fields if not isinstance(f, peewee.AutoField)]
        self._given = set(columns)
        quote = db.quote[0]

        def name(field: peewee.Field) -> str:
            return f"{quote}{field.column_name}{quote}"

        updated = [
            f
            for f in self.fields
            if (f.name in columns and f.name not in ("uid", "created_at")) or f.name == "swept"
        ]
        table_name = f"{quote}{meta.table_name}{quote}"
        self.sql = (
            f"INSERT INTO {table_name} ({', '.join(name(f) for f in self.fields)}) "
            f"VALUES ({', '.join([db.param] * len(self.fields))}) "
            f"ON CONFLICT ({name(meta.fields['uid'])}) DO UPDATE SET "
            + ", ".join(f"{name(f)} = EXCLUDED.{name(f)}" for f in updated)
            + f" WHERE {table_name}.{quote}status{quote} = {db.param}"
            f" OR {table_name}.{quote}swept{quote} = {db.param}"
        )
        self._json_text = not isinstance(db, peewee.PostgresqlDatabase)
        self._constants = ("pending", True)

    def params(self, row: dict) -> list[Any]:
        values = []
        for field in self.fields:
            if field.name in self._given:
                value = row[field.name]
            else:
                value = field.default() if callable(field.default) else field.default
            if value is not None:
                if isinstance(field, peewee.JSONField) and self._json_text:
                    value = json.dumps(value)  # SQLite keeps JSON as text
                else:
                    value = field.db_value(value)
            values.append(value)
        return [*values, *self._constants]


_UPSERTS: dict[tuple, _Upsert] = {}


def _upsert(table: type[peewee.Model], columns: tuple[str, ...]) -> _Upsert:
    key = (id(database.obj), table, columns)
    statement = _UPSERTS.get(key)
    if statement is None:
        statement = _UPSERTS[key] = _Upsert(table, columns)
    return statement


def _reset_connection() -> None:
    """After a failed write, drop this greenlet's connection; the next write reconnects."""
    try:
        if not database.is_closed():
            database.close()
    except peewee.PeeweeException:
        pass


recorder = Recorder()
