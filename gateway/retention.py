"""Old records go: whole rows after ``RETENTION_DAYS``, prompt and answer after ``RETENTION_BODY_DAYS``.

Every process runs the job every ``RETENTION_INTERVAL`` seconds and one instance at a
time does the work: on PostgreSQL the one holding an advisory lock (its session's:
a killed holder's lock goes with its connection), on SQLite the one holding an
exclusive ``flock`` on a file beside the database file (every process using that
file is on that machine; the kernel frees the lock when its holder dies, where a
lock row would have to expire). The others find it taken and skip the round.

The work, in this order:

- PostgreSQL: the month partitions of ``completions`` are made ahead and those
  wholly older than the retention dropped (``partitions.py``); this runs even with
  retention off, so that rows keep landing in their month's partition.
- Rows of ``completions``, ``embeddings`` and ``srv_logs`` older than
  ``RETENTION_DAYS`` are deleted, oldest first. What deleted calls of the month in
  progress cost goes to their keys' ``retired_spend``, in the same transaction: a
  retention under a month must not lower what a budget counts (``ledger.month_spend``).
- Rows older than ``RETENTION_BODY_DAYS`` keep their numbers (tokens, cost, times,
  status, error) and lose their bodies: prompt, answer, stored replay and what was
  delivered (embeddings: input and vectors), and with them their full-text entries.

Rows go ``RETENTION_BATCH`` at a time, one short statement each, with a pause of
``RETENTION_PAUSE`` seconds between: the recorder's writes (and on SQLite, whose one
writer lock every write shares, everyone's) wait at most one batch.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import reduce
from operator import or_
from pathlib import Path
from typing import Any

import gevent
import gevent.pool
from flask import Flask
from gevent import monkey

from gateway import db, ledger, partitions
from gateway.config import DEFAULTS, INSTANCE
from gateway.db import UNREACHABLE, database, is_postgres
from gateway.models import Completion, Embedding, RetiredSpend, SrvLog, utcnow

log = logging.getLogger(__name__)

STRIP_WINDOW = timedelta(hours=6)  # of creation times, per body-stripping query
# What a body is: the text of a call; everything else on the row is kept.
BODIES: dict[Any, tuple[str, ...]] = {
    Completion: ("prompt", "completion", "cached_response", "delivered"),
    Embedding: ("input", "embedding"),
}


class Retention:
    """The retention job of this process."""

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self.clock = clock
        self.days: float | None = None
        self.body_days: float | None = None
        self.lock_file: Path | None = None  # None: beside the SQLite file
        self._configure(DEFAULTS)  # until init_app reads the app's settings
        self._stripped_to: dict[Any, datetime] = {}  # bodies gone up to here, per table
        self._group = gevent.pool.Group()
        self._started = False

    def init_app(self, app: Flask) -> None:
        """Read the RETENTION_* settings; start the job in a server process."""
        self._configure(app.config)
        self._stripped_to.clear()
        if self._started or self.interval <= 0 or not monkey.is_module_patched("socket"):
            return  # a CLI command, or the job turned off (tests run it by hand)
        self._started = True
        greenlet = self._group.spawn(self._loop)
        greenlet.link_exception(lambda g: log.error("retention greenlet died", exc_info=g.exc_info))

    def _configure(self, cfg: Any) -> None:
        self.days = days(cfg["RETENTION_DAYS"])
        self.body_days = days(cfg["RETENTION_BODY_DAYS"])
        self.interval = float(cfg["RETENTION_INTERVAL"])
        self.batch = int(cfg["RETENTION_BATCH"])
        self.pause = float(cfg["RETENTION_PAUSE"])
        self.timeout = float(cfg["DB_TIMEOUT"])
        self.lock_file = Path(cfg["RETENTION_LOCK_FILE"]) if cfg["RETENTION_LOCK_FILE"] else None

    def wanted(self) -> bool:
        """True when there is work: retention set, or partitions to keep (PostgreSQL)."""
        return self.interval > 0 and (
            self.days is not None or self.body_days is not None or is_postgres()
        )

    def _loop(self) -> None:
        # Workers start together: spread their first tries (only one gets the lock anyway).
        gevent.sleep(random.uniform(0.0, min(30.0, self.interval if self.interval > 0 else 30.0)))
        while True:
            if self.wanted():
                try:
                    self.run()
                except UNREACHABLE:
                    pass  # the heartbeat and the recorder say so; the next round retries
                except Exception:
                    log.exception("retention: a run failed")
            gevent.sleep(self.interval if self.interval > 0 else 60.0)

    # -- one run -----------------------------------------------------------------

    def run(self) -> dict[str, Any] | None:
        """Do one round; return what was done, or None if another instance holds the lock."""
        opened = database.is_closed()
        if opened:
            database.connect()
        try:
            with self._lock() as held:
                if not held:
                    return None
                return self._work(self.clock())
        finally:
            if opened and not database.is_closed():
                database.close()

    def _work(self, now: datetime) -> dict[str, Any]:
        done: dict[str, Any] = {}
        with db.background(self.timeout):
            is_partitioned = partitions.partitioned()
            if is_partitioned:
                done["partitions_made"] = partitions.create_ahead(now)
        if (cutoff := older_than(now, self.days)) is not None:
            if is_partitioned:
                with db.background(self.timeout):
                    done["partitions_dropped"] = partitions.drop_before(cutoff)
            for table in (Completion, Embedding, SrvLog):
                done[table._meta.table_name] = self._delete_older(table, cutoff, now)
            with db.background(self.timeout):  # no budget reads a month before this one
                _changed(RetiredSpend.delete().where(RetiredSpend.month < f"{now:%Y-%m}"))
        if (cutoff := older_than(now, self.body_days)) is not None:
            for table in BODIES:
                done[f"{table._meta.table_name}_bodies"] = self._strip_older(table, cutoff)
        if any(done.values()):
            log.info("retention: %s", done)
        return done

    def _delete_older(self, table: Any, cutoff: datetime, now: datetime) -> int:
        """Delete ``table``'s rows created before ``cutoff``, a batch at a time; what
        deleted calls of ``now``'s month cost is kept for their keys' budgets."""
        total = 0
        while True:
            with db.background(self.timeout):
                rows = list(
                    table.select(table.id, table.created_at)
                    .where(table.created_at < cutoff)
                    .order_by(table.created_at)
                    .limit(self.batch)
                    .tuples()
                )
                if not rows:
                    return total
                # The time range lets PostgreSQL look in the partitions concerned only.
                query = table.delete().where(
                    table.id.in_([id_ for id_, _ in rows])
                    & table.created_at.between(rows[0][1], rows[-1][1])
                )
                priced = table in (Completion, Embedding)
                total += _retired(table, query, now) if priced else _changed(query)
            gevent.sleep(self.pause)

    def _strip_older(self, table: Any, cutoff: datetime) -> int:
        """Empty the bodies of ``table``'s finished rows created before ``cutoff``.

        Walks time in windows of ``STRIP_WINDOW`` from where the last run stopped (this
        process's memory; after a restart, the oldest row): stripped rows stay in the
        table, so a query for "the oldest rows with a body" would read through all of
        them every time; a window's query reads at most that window's rows.
        """
        fields = [table._meta.fields[name] for name in BODIES[table]]
        has_body = reduce(or_, [field.is_null(False) for field in fields])
        since = self._stripped_to.get(table)
        if since is None:
            with db.background(self.timeout):
                oldest = table.select(table.created_at).order_by(table.created_at).first()
            if oldest is None:
                return 0
            since = oldest.created_at
        total = 0
        while since < cutoff:
            until = min(since + STRIP_WINDOW, cutoff)
            window = (table.created_at >= since) & (table.created_at < until)
            while True:
                with db.background(self.timeout):
                    rows = list(
                        table.select(table.id, table.created_at)
                        .where(window & (table.status != "pending") & has_body)
                        .order_by(table.created_at)
                        .limit(self.batch)
                        .tuples()
                    )
                    if not rows:
                        break
                    ids = [id_ for id_, _ in rows]
                    total += _changed(
                        table.update({field: None for field in fields}).where(
                            table.id.in_(ids) & table.created_at.between(rows[0][1], rows[-1][1])
                        ),
                        # Their full-text entries go with their text (SQLite's FTS5 table).
                        _forget_text(ids) if table is Completion else None,
                    )
                gevent.sleep(self.pause)
            self._stripped_to[table] = since  # every row before ``since`` is done
            if until == cutoff:
                break  # the cut-off moves on: this window is looked at again next run
            since = until
            gevent.sleep(0)
        return total

    # -- one instance at a time ----------------------------------------------------

    @contextmanager
    def _lock(self) -> Iterator[bool]:
        """Hold the retention lock for the block; yields False if someone else holds it."""
        if is_postgres():
            with self._advisory_lock() as held:
                yield held
        else:
            with self._file_lock() as held:
                yield held

    @contextmanager
    def _advisory_lock(self) -> Iterator[bool]:
        with db.background(self.timeout):
            cursor = database.execute_sql("SELECT pg_try_advisory_lock(%s)", (db.RETENTION_LOCK,))
            held = bool(cursor.fetchone()[0])
        try:
            yield held
        finally:
            if held:
                try:
                    with db.background(self.timeout):
                        database.execute_sql("SELECT pg_advisory_unlock(%s)", (db.RETENTION_LOCK,))
                except Exception:
                    # A pooled connection must not go back still holding the lock.
                    db.discard_connection()
                    log.warning("retention: could not release the lock; connection dropped")

    @contextmanager
    def _file_lock(self) -> Iterator[bool]:
        path = self.lock_file or _beside_database()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def older_than(now: datetime, days: float | None) -> datetime | None:
    """When a record ``days`` old at ``now`` began; None if retention is off, or if that
    is before the first time a datetime holds (the largest retention the settings take,
    about 2.7 million years): nothing is that old."""
    if days is None:
        return None
    try:
        return now - timedelta(days=days)
    except OverflowError:
        return None


def days(value: object) -> float | None:
    """A retention in days; None (or 0, or empty) is off."""
    if value in (None, "", 0, "0"):
        return None
    days = float(value)  # type: ignore[arg-type]
    if days <= 0:
        raise ValueError(f"a retention must be a positive number of days, not {value!r}")
    return days


def _beside_database() -> Path:
    """The SQLite lock file: ``<database file>-retention.lock`` (instance/ for :memory:)."""
    path = database.obj.database
    if path == ":memory:":
        return INSTANCE / "retention.lock"
    return Path(f"{path}-retention.lock")


def _changed(query: Any, then_on_sqlite: tuple[str, list[Any]] | None = None) -> int:
    """Run a write; the number of rows it changed.

    On SQLite, with ``then_on_sqlite`` after it in the same transaction, beside the
    loop (``db.sqlite_write``): a batch's index work (the full-text trigger) is tens of
    milliseconds, which the worker's calls would otherwise wait out.
    """
    if is_postgres():
        return query.execute()
    statements = [query.sql(), ("SELECT changes()", [])]
    if then_on_sqlite is not None:
        statements.append(then_on_sqlite)
    return db.sqlite_write(statements)[1][0][0]


def _retired(table: Any, query: Any, now: datetime) -> int:
    """Delete a batch of calls (``query``); the number deleted. In the same transaction,
    what those of ``now``'s month cost is added to their keys' spend retired in that month
    (``RetiredSpend``): taken from the rows the delete itself returns, so a row changed
    between the batch's choice and its delete (made final) counts as it was deleted."""
    month = ledger.month_start(now)
    query = query.returning(table.api_key, table.status, table.created_at, table.cost_nanos)

    def spend(deleted: list[tuple]) -> list[Any]:
        nanos: dict[int, int] = {}
        for key_id, status, created_at, cost in deleted:
            if cost and status != "pending" and table.created_at.python_value(created_at) >= month:
                nanos[key_id] = nanos.get(key_id, 0) + int(cost)
        return RetiredSpend.added(nanos, f"{month:%Y-%m}")

    if is_postgres():
        with database.atomic():
            deleted = list(query.tuples().execute())
            for statement in spend(deleted):
                statement.execute()
        return len(deleted)
    written = db.sqlite_write(
        [query.sql(), lambda results: [statement.sql() for statement in spend(results[0])]]
    )
    return len(written[0])


def _forget_text(ids: list[int]) -> tuple[str, list[Any]]:
    """The statement that drops rows' full-text entries (SQLite's FTS5 table; 0006_search)."""
    marks = ", ".join(["?"] * len(ids))
    return f"DELETE FROM completions_fts WHERE rowid IN ({marks})", ids


retention = Retention()
