"""The only writer of call records: a queue, background writers, and the journal.

``record(exchange)`` never blocks and never touches the database: it marks the call
dirty and wakes the writers. Unless a whole batch is waiting, a writer lets
``RECORDER_INTERVAL`` pass before it takes one, so the calls of that interval share one
write and a worker is not switched to its writers on every call. A writer takes a batch
of dirty calls, snapshots each (``callrows.snapshot``: ``Exchange.row()``, stamped with
this process's ``owner``) and hands the batch to ``writes.upsert_records`` in one short
transaction, so a call that ended before its pending row was written is inserted once,
final. A call is never in two batches at once, so its writes land in order; a snapshot
queued while the previous one is being written waits for it. A pending row never
overwrites a final one, so stale snapshots are harmless, whatever order they arrive in.

Writing shares the worker with the calls, so it is kept cheap and short: writers keep
their connection, a pending snapshot lingers ``RECORDER_LINGER`` seconds (a call that
ends by then is written once, final), ``api_keys.last_seen`` is moved at most every 30 s
per key, and a writer hands the worker back every ``SLICE`` rows of its CPU work
(snapshots, statements), so no call waits long behind a batch. A writer survives
anything: a batch the database cannot take goes to the journal (``journal.py``) and is
replayed through the same ``write_rows`` once the database answers (SPEC rule 8); a row
it refuses is set aside (with the disk full, held in memory alone while the rest of its
batch is written: ``held.py``), for an operator's ``replay-refused``
(``cli.replay_refused``). ``drain()`` journals whatever is still queued or in flight at
shutdown. Dead processes' pending rows are the sweeper's (``sweeper.py``).

What waits in memory would die with the process (``kill -9``, the OOM killer): so
``record`` first writes the snapshot to the worker's write-ahead file
(``ahead.Ahead``, ``RECORDER_AHEAD``; the line is ``callrows.ahead_row``), before the
upstream is contacted or the answer goes; the file forgets what the database or the
journal took, and a dead worker's is replayed by a live one.

On SQLite a final call's text goes to the full-text index in lots: a writer indexes
what is due when ``indexdue.IndexDue`` says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
from flask import Flask
from gevent import monkey

from gateway import db, jsonio, metrics, retention
from gateway.ahead import Ahead
from gateway.callrows import ahead_row, snapshot
from gateway.config import DEFAULTS, INSTANCE
from gateway.db import UNREACHABLE, database, is_postgres
from gateway.exchange import Exchange
from gateway.held import HOLD_RETRY, Held, lost
from gateway.indexdue import IndexDue
from gateway.journal import Journal
from gateway.models import utcnow
from gateway.telemetry import telemetry
from gateway.writes import upsert_records

log = logging.getLogger(__name__)

TOUCH_EVERY = 30.0  # seconds between last_seen updates of one key
SLICE = 20  # rows snapshotted or sent between two yields to the calls (about 1 ms)


class _Unkept(Exception):
    """Rows the database refused that could not be set aside either (a full disk): the
    rest of their batch was written, these alone are to be held."""

    def __init__(self, rows: list[dict], cause: Exception) -> None:
        super().__init__(f"{len(rows)} refused record(s) could not be set aside: {cause}")
        self.rows = rows


class Recorder:
    """Writes exchanges in the background; one per worker process."""

    def __init__(self) -> None:
        self._dirty: dict[str, Exchange] = {}
        self._writing: dict[str, Exchange] = {}  # taken by a writer, not written yet
        self._inflight: dict[int, list[dict]] = {}  # writer -> the rows it is writing
        self._wake = gevent.event.Event()
        self._idle = gevent.event.Event()
        self._idle.set()
        self._group = gevent.pool.Group()
        self._journaling = False
        self._held = Held()  # neither the database nor the journal takes records
        self._started = False
        self.writes = 0  # rows written, for tests and metrics
        self.journaled = 0
        self._waiting = 0  # this worker's records in the journal, for /metrics
        self.replayed = 0
        # Told of rows written back from a journal: records the database lacked until
        # now, which a reader of the records may have to read again (``spend``).
        self.on_written_late: Callable[[list[dict]], None] = lambda rows: None
        self._configure(DEFAULTS)  # until init_app reads the app's settings
        self._key_touched: dict[int, float] = {}
        self._index_due = IndexDue()  # SQLite: the text due to the full-text index
        self.ahead: Ahead | None = None  # the write-ahead file (RECORDER_AHEAD)
        self._ahead_rows: dict[str, dict] = {}  # final rows written ahead, for the writer

    def init_app(self, app: Flask) -> None:
        """Read settings; start the writers and the replayer."""
        cfg = app.config
        self._configure(cfg)
        writers = cfg["RECORDER_WRITERS"] or (4 if is_postgres() else 1)
        self.journal = Journal(Path(cfg["JOURNAL_DIR"] or INSTANCE / "journal"))
        if self.ahead is not None:
            self.ahead.close(remove=not self.backlog())
        self.ahead = Ahead(self.journal.directory) if cfg["RECORDER_AHEAD"] else None
        # Only a gevent server (a worker, or the test process) writes in the
        # background; a CLI command builds the app without needing the greenlets.
        if self._started or not monkey.is_module_patched("socket"):
            return
        self._started = True
        for _ in range(int(writers)):
            self._spawn(self._write_loop)
        self._spawn(self._replay_loop)

    def _configure(self, cfg: Any) -> None:
        self.batch_size = int(cfg["RECORDER_BATCH"])
        self.linger = float(cfg["RECORDER_LINGER"])
        self.interval = float(cfg["RECORDER_INTERVAL"])
        self.timeout = float(cfg["DB_TIMEOUT"])
        self.replay_interval = float(cfg["JOURNAL_REPLAY_INTERVAL"])
        self.kept_days = retention.days(cfg["RETENTION_DAYS"])  # records' lifetime

    # -- the public face ------------------------------------------------------

    def record(self, exchange: Exchange) -> None:
        """Queue the exchange's current state to be written (and, first, write it ahead)."""
        ahead = self.ahead
        if ahead is not None:
            if ahead.full:
                ahead.rotate({*self._dirty, *self._writing})
            try:
                row = ahead_row(exchange)
                ahead.append(row)
                if exchange.finished:  # final: the writer takes this row, not a new one
                    self._ahead_rows[exchange.uid] = row
            except Exception:  # a bug here must not cost the call, nor its record
                log.exception("recorder: the write-ahead line of %s failed", exchange.uid)
        self._dirty[exchange.uid] = exchange
        self._idle.clear()
        self._wake.set()  # while the writers are busy or gathering: nobody to switch to

    def backlog(self) -> int:
        """Calls queued or being written."""
        return len(self._dirty) + len(self._writing)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for everything queued to be written."""
        return self._idle.wait(timeout)

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued is written; journal the rest. True if written."""
        if self._idle.wait(timeout):
            if self.ahead is not None:
                self.ahead.close(remove=True)
            return True
        # Rows being written may never land (the process is about to exit), and a
        # call's newer snapshot may be queued behind them: journal both, older first.
        # Replaying a row that did land changes nothing.
        rows = [row for batch in self._inflight.values() for row in batch]
        # A writer may still be taking its batch's snapshots: take the rest now. Not
        # those taken: a call recorded since is queued as well, and a record's JSON
        # is most of the time the exit has (8 MB: 0.3 s on a loaded 2-core machine).
        taken = {row["uid"] for row in rows}
        rest = [ex for uid, ex in self._writing.items() if uid not in taken]
        rows += _snapshots([*rest, *self._dirty.values()], self._ahead_rows)
        self._dirty.clear()
        kept = True
        if rows:
            kept = self._journal_or_log(rows)
        log.warning("recorder: journaled %d records not written in time", len(rows))
        if self.ahead is not None and kept:
            self.ahead.close(remove=True)  # else a survivor replays it
        self._settle()
        return False

    # -- writing --------------------------------------------------------------

    def _spawn(self, fn: Any) -> None:
        greenlet = self._group.spawn(fn)
        greenlet.link_exception(lambda g: log.error("recorder greenlet died", exc_info=g.exc_info))

    def _write_loop(self) -> None:
        me = id(gevent.getcurrent())
        while True:
            if len(self._dirty) < self.batch_size:
                gevent.sleep(self.interval)  # let the calls ending meanwhile join the batch
            indexing = self._index_due.at(self._journaling)
            if indexing is not None and indexing <= time.monotonic():
                self._index_due.index(self.timeout)
            batch, due = self._take_batch()
            if not batch:
                # Nothing to write now: what is dirty is lingering or being written by
                # another writer (which rescans before it sleeps). No switch happens
                # between the scan and the clear, so no wake-up is lost.
                self._wake.clear()
                self._settle()
                indexing = self._index_due.at(self._journaling)
                if indexing is not None:
                    due = indexing if due is None else min(due, indexing)
                self._wake.wait(None if due is None else max(0.0, due - time.monotonic()))
                continue
            rows = self._inflight[me] = []
            held, taken = False, batch  # the calls the database or the journal took
            try:
                for start in range(0, len(batch), SLICE):
                    rows += _snapshots(batch[start : start + SLICE], self._ahead_rows)
                    gevent.sleep(0)  # the calls go first; drain() sees the batch in _writing
                if self._journaling:
                    self._journal_else_write(rows)
                else:
                    self._write_or_journal(rows)
            except _Unkept as exc:
                unkept = {row["uid"] for row in exc.rows}
                held = self._journal_or_hold(exc.rows, [ex for ex in batch if ex.uid in unkept])
                if held:
                    taken = [ex for ex in batch if ex.uid not in unkept]
            except Exception:
                if self._held.since is None:  # while holding, said once
                    log.exception("recorder: could not write %d records; journaling", len(rows))
                held = self._journal_or_hold(rows, batch)
                if held:
                    taken = []
            finally:
                self._inflight.pop(me, None)
                for ex in batch:
                    self._writing.pop(ex.uid, None)
                self._settle()
            self._held.released(ex.uid for ex in taken)
            if self.ahead is not None:  # their latest state is in, unless queued anew
                self.ahead.taken({ex.uid for ex in taken} - self._dirty.keys())
            if held:
                gevent.sleep(HOLD_RETRY)

    def _settle(self) -> None:
        if not self._dirty and not self._writing:
            self._idle.set()
            if self.ahead is not None:
                self.ahead.clear()

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
            self._writing[uid] = ex
            if len(batch) >= self.batch_size:
                break
        return batch, due

    def _write_or_journal(self, rows: list[dict]) -> None:
        now = time.monotonic()
        due = {
            r["api_key"]
            for r in rows
            if now - self._key_touched.get(r["api_key"], -1e9) > TOUCH_EVERY
        }
        started = time.perf_counter()
        try:
            self._bounded_write(rows, touch=due)
        except UNREACHABLE as exc:
            away = "gave the write up" if isinstance(exc, db.Conflict) else "unreachable"
            log.warning("recorder: database %s (%s); journaling %d records", away, exc, len(rows))
            self._journaling = True
            self._journal(rows)
            return
        except Exception:
            # The database (or our own code) refused something in the batch: find it,
            # keep the rest.
            self._write_each(rows)
            return
        metrics.recorder_wrote(time.perf_counter() - started)
        self.writes += len(rows)
        self._key_touched.update(dict.fromkeys(due, now))

    def _write_each(self, rows: list[dict]) -> None:
        """Write rows one by one; journal them if the database goes away, set aside refusals.

        A refusal the disk will not take either (full) does not stop the rows after it:
        they are written, then ``_Unkept`` names the refused rows that are left.
        """
        unkept: list[dict] = []
        cause: Exception | None = None
        for i, row in enumerate(rows):
            try:
                self._bounded_write([row])
                self.writes += 1
            except UNREACHABLE:
                self._journaling = True
                self._journal(unkept + rows[i:])  # the rest would only wait for the timeout
                return
            except Exception:
                if row.get("uid") not in self._held:  # held: said when it was first
                    log.exception("recorder: record %s refused; set aside", row.get("uid"))
                try:
                    self.journal.append([row], prefix="refused")
                except Exception as exc:
                    unkept.append(row)
                    cause = exc
                else:
                    metrics.records_refused(1)
        if cause is not None:
            raise _Unkept(unkept, cause)

    def _bounded_write(self, rows: list[dict], touch: set[int] | None = None) -> None:
        """``write_rows`` on this greenlet's kept connection, within ``DB_TIMEOUT``; again
        at once if PostgreSQL gave it up for another transaction (rolled back whole, and
        an upsert written twice changes nothing)."""
        try:
            with gevent.Timeout(self.timeout, db.DatabaseTimeout("record write timed out")):
                for again in range(db.CONFLICT_RETRIES, -1, -1):
                    try:
                        write_rows(rows, touch)
                        break
                    except db.Conflict as exc:
                        if not (again and exc.retryable):
                            raise
                        log.info("recorder: a write was given up (%s); written again", exc.reason)
            db.mark_reachable(True)
            self._index_due.written(rows)
        except UNREACHABLE as exc:
            db.discard_connection()
            if not isinstance(exc, db.Conflict):  # the database answered
                db.mark_reachable(False)
            raise
        except Exception:
            db.discard_connection()  # a failed statement may leave the connection unusable
            raise

    # -- the journal ----------------------------------------------------------

    def _journal_else_write(self, rows: list[dict]) -> None:
        """Journal rows while the journal is being written back; if the disk will not
        take them (full, or remounted read-only), try the database: it may be back,
        and the journal's old file waits for the disk (``_replay_loop``). Before, such
        rows stayed held in memory for as long as the disk refused."""
        try:
            self._journal(rows)
        except OSError as exc:
            if self._held.since is None:
                log.warning("recorder: the journal failed (%s); trying the database", exc)
            self._write_or_journal(rows)

    def _journal(self, rows: list[dict], exiting: bool = False) -> None:
        self.journal.append(rows, exiting=exiting)
        self.journaled += len(rows)
        self._waiting += len(rows)
        metrics.journal_depth(self._waiting)

    def _journal_or_log(self, rows: list[dict]) -> bool:
        """At exit: journal rows taken from the queue, written and synced on the loop
        (``Journal.append``); else log them lost."""
        try:
            self._journal(rows, exiting=True)
        except Exception:  # a full or broken disk at exit: nothing left to keep them in
            lost(rows, "the journal failed at exit")
            return False
        return True

    def _journal_or_hold(self, rows: list[dict], batch: list[Exchange]) -> bool:
        """Journal a batch no write took; if the disk will not take it either (full,
        failing), keep its calls queued to try again (True), up to ``held.HOLD_BYTES``."""
        try:
            self._journal(rows)
        except Exception:
            return self._hold(rows, batch)
        return False

    def _hold(self, rows: list[dict], batch: list[Exchange]) -> bool:
        """Queue a batch's calls again, while the journal's failure is being handled."""
        if not self._held.hold(rows):
            return False
        for ex in batch:
            self._dirty.setdefault(ex.uid, ex)  # a newer snapshot queued meanwhile: same call
        return True

    def _replay_loop(self) -> None:
        away = False
        while True:
            try:
                self._replay_round()
                away = False
            except UNREACHABLE as exc:
                if not away:  # once per outage, not every round
                    log.warning("recorder: the journal cannot be written back (%s)", exc)
                away = True
            except Exception:
                log.exception("recorder: journal replay failed")
            gevent.sleep(self.replay_interval)

    def _replay_round(self) -> None:
        """Write back what waits in files: this process's journal, dead ones' journals
        and write-ahead lines; raise ``UNREACHABLE`` if the database does not answer.

        A replay reads a file on the loop, a lot at a time, and gives it back when the
        write fails (copied, when its owner has started another meanwhile): after a
        long outage, most of a second per 100 MB of journal, every JOURNAL_REPLAY_INTERVAL
        (5 s), for every call of the worker. So the database is asked first, and nothing
        is read while it does not answer.
        """
        own = self._journaling or self.journal.waiting()
        ahead = self.journal.waiting("ahead")  # a dead process's write-ahead lines
        if not (own or ahead):
            return
        with db.background(self.timeout):
            database.execute_sql("SELECT 1")
        if own:
            self._replay_once()
        if ahead:
            self.journal.replay(self._write_ahead, prefix="ahead")

    def _replay_once(self) -> None:
        """Write back this process's journal and any left by dead processes."""
        self.journal.replay(self._write_replayed)
        # Writers that journaled while we replayed left a new file: keep journaling.
        self._journaling = self.journal.has_own()
        if not self._journaling and self._waiting:
            self._waiting = 0
            metrics.journal_depth(0)

    def _write_ahead(self, rows: list[dict]) -> None:
        """A dead process's write-ahead lines: as written, uncleaned (``callrows.ahead_row``).

        Not those of calls older than RETENTION_DAYS. A file keeps lines the database
        has (up to ``Ahead.TRIM``: days of a quiet worker's calls), and one of a record
        retention deleted would bring it back: its cost, in ``retired_spend`` already,
        would count twice in its key's budget (and again once retention deleted it anew).
        """
        cutoff = retention.older_than(utcnow(), self.kept_days)
        if cutoff is not None:
            rows = [row for row in rows if not _older(row, cutoff)]
        self._write_replayed([jsonio.clean(row) for row in rows])

    def _write_replayed(self, rows: list[dict]) -> None:
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            try:
                self._bounded_write(batch)
            except UNREACHABLE:
                raise  # still away: the journal file is given back
            except Exception:
                self._write_each(batch)  # a refused row must not block the rest
            else:
                self.replayed += len(batch)
            self.on_written_late(batch)


def _older(row: dict, cutoff: datetime) -> bool:
    """Whether the row's call began before ``cutoff`` (a row without a time is not)."""
    created_at = row.get("created_at")
    return isinstance(created_at, datetime) and created_at < cutoff


def _snapshots(batch: list[Exchange], ahead: dict[str, dict]) -> list[dict]:
    """Each call's snapshot: a final one's row as its write-ahead line took it (``ahead``,
    popped), cleaned; else taken now."""
    rows = []
    for ex in batch:
        try:
            row = ahead.pop(ex.uid, None)
            rows.append(jsonio.clean(row) if row is not None else snapshot(ex))
        except Exception:  # a bug in one call's facts must not cost the others theirs
            log.exception("recorder: LOST record %s: cannot take its snapshot", ex.uid)
            metrics.records_lost(1)
    return rows


def write_rows(rows: list[dict], touch_keys: set[int] | None = None) -> list[dict]:
    """Upsert snapshots and move their keys' ``last_seen`` to the calls' time.

    ``touch_keys``: the key ids whose ``last_seen`` to move (default: every row's key).
    Returns the snapshots the database took, with their row ids (``upsert_records``).
    """
    seen: dict[int, datetime] = {}
    for row in rows:
        key = row["api_key"]
        if touch_keys is None or key in touch_keys:
            seen[key] = max(seen.get(key, row["created_at"]), row["created_at"])
    if database.is_closed():
        database.connect()  # the writer's own connection, kept between batches
    written = upsert_records(rows, seen)  # on SQLite, beside the loop (``db.sqlite_write``)
    # Committed: the spans agree with the rows. Only what the database took: a
    # snapshot it refused (a replay of one already written) makes no second span.
    telemetry.export(written)
    return written


recorder = Recorder()
