"""The database handle: SQLite's work beside the event loop."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from gateway.db import database, open_database, sqlite_write
from gateway.sqlitedb import beside_loop
from tests.loopwatch import assert_kept_turning, lost_wakeups, watch_loop
from tests.servers import sqlite_lock_held

# Counts to a billion: many seconds of SQLite's own work, unless interrupted.
_LONG = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000000)"
    " SELECT count(*) FROM n"
)


# Rows a statement beside the loop counts: about 1.6 s of SQLite's work here. Long enough
# that a pause of the whole machine (0.3 and 0.5 s were seen in CI, in blocks of 0.8 and
# 1.1 s) stays under a third of it, where the statement on the loop stops it throughout.
_ROWS = 6_000_000


def _fetch(conn: sqlite3.Connection, sql: str) -> list[tuple]:
    return conn.execute(sql).fetchall()


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "db.sqlite", check_same_thread=False)


def test_a_statement_runs_while_the_loop_goes_on(conn: sqlite3.Connection) -> None:
    sql = _LONG.replace("1000000000", str(_ROWS))
    with watch_loop() as watch:
        assert beside_loop(conn, _fetch, conn, sql) == [(_ROWS,)]
    assert_kept_turning(watch)


def test_a_wait_cut_short_interrupts_the_statement_and_leaves_the_connection_usable(
    conn: sqlite3.Connection,
) -> None:
    started = time.monotonic()
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.2):
        beside_loop(conn, _fetch, conn, _LONG)
    # Not left running in its thread: the connection is free again at once.
    assert time.monotonic() - started < 1.0
    assert beside_loop(conn, _fetch, conn, "SELECT 1") == [(1,)]


def test_an_error_in_the_statement_reaches_the_caller_and_only_the_caller(
    conn: sqlite3.Connection, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        beside_loop(conn, _fetch, conn, "SELECT * FROM nowhere")
    gevent.sleep(0.05)  # the pool's own wake-up has come and gone
    # Not also printed by the hub as a failed task: the caller decides what it means.
    assert "OperationalError" not in capfd.readouterr().err


def test_a_lost_wake_up_from_the_pool_costs_a_look_not_the_worker(
    conn: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """The hub never hears that the thread finished; the wait looks, and goes on."""
    with lost_wakeups() as held:
        assert beside_loop(conn, _fetch, conn, "SELECT 2") == [(2,)]
    assert held, "the pool's wake-up was not held back: this test shows nothing"
    assert "a SQLite task ended without waking the loop" in caplog.text
    assert beside_loop(conn, _fetch, conn, "SELECT 3") == [(3,)]


def test_a_read_outside_a_transaction_runs_beside_the_loop(tmp_path: Path) -> None:
    """A dashboard's aggregate over a big table must not stop the worker's calls."""
    db = open_database(f"sqlite:///{tmp_path}/gw.db")
    # A new file's first connection makes it WAL, syncing the disk four times on the
    # loop: 0.49 s in CI with PostgreSQL writing beside it. A worker's file is made
    # before it serves; what is watched here is the read.
    with db.connection_context():
        pass
    with watch_loop() as watch, db.connection_context():
        assert db.execute_sql(_LONG.replace("1000000000", str(_ROWS))).fetchall() == [(_ROWS,)]
        assert db.execute_sql("SELECT 1 UNION ALL SELECT 2").fetchone() == (1,)
    assert_kept_turning(watch)


def test_a_read_inside_a_write_transaction_keeps_the_loop(tmp_path: Path) -> None:
    """Had the transaction's read let the loop go, a greenlet of the same worker could
    take it into SQLite's busy handler (in C) waiting for the lock the transaction
    holds, while the transaction waited for the loop to commit: 5 s, then 'locked'."""
    db = open_database(f"sqlite:///{tmp_path}/gw.db")
    count = _LONG.replace("1000000000", "2000000")
    with db.connection_context():
        db.execute_sql("CREATE TABLE t (x INTEGER)")
        started = time.monotonic()
        db.execute_sql(count).fetchall()
        alone = time.monotonic() - started  # seconds on a loaded machine: measured

    def holder() -> None:
        with db.connection_context(), db.atomic():
            db.execute_sql("INSERT INTO t VALUES (1)")
            db.execute_sql(count).fetchall()

    def other() -> None:
        with db.connection_context():
            db.execute_sql("INSERT INTO t VALUES (2)")

    started = time.monotonic()
    first = gevent.spawn(holder)
    gevent.sleep(0)  # the holder has begun and holds the lock
    second = gevent.spawn(other)
    gevent.joinall([first, second], timeout=10)
    assert first.successful(), first.exception
    assert second.successful(), second.exception
    assert time.monotonic() - started < alone + 2.5, "not the read's time: a busy wait too"
    with db.connection_context():
        assert sorted(db.execute_sql("SELECT x FROM t").fetchall()) == [(1,), (2,)]


def test_a_write_waiting_for_another_process_lock_keeps_the_loop(tmp_path: Path) -> None:
    """A write outside a transaction (a heartbeat, a server log, an admin change) that
    finds another worker's recorder holding the lock waits in SQLite's busy handler,
    in C: beside the loop, not on it."""
    path = tmp_path / "gw.db"
    db = open_database(f"sqlite:///{path}")
    with db.connection_context():
        db.execute_sql("CREATE TABLE t (x INTEGER)")
    # Held long enough that a loaded machine's pause (0.26 s was seen in CI) is under a
    # third of it, where a write waiting on the loop would stop it for the whole hold.
    with sqlite_lock_held(path, 1.2), watch_loop() as watch, db.connection_context():
        assert db.execute_sql("INSERT INTO t VALUES (1)").rowcount == 1
    assert_kept_turning(watch)
    with db.connection_context():
        assert db.execute_sql("SELECT x FROM t").fetchall() == [(1,)]


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Path]:
    """The app's database proxy on a SQLite file of the test's own (with a table ``t``),
    as a worker has it; the proxy's previous database afterwards."""
    path = tmp_path / "gw.db"
    before = database.obj
    database.initialize(open_database(f"sqlite:///{path}"))
    try:
        with database.connection_context():
            database.execute_sql("CREATE TABLE t (x INTEGER)")
        yield path
    finally:
        database.initialize(before)


def test_sqlite_write_turns_the_busy_handler_off_once_and_anything_else_on_again(
    proxied: Path,
) -> None:
    """``sqlite_write`` turns SQLite's busy handler off for its ``BEGIN IMMEDIATE`` (it
    waits for the lock in gevent) and leaves it off for its next write, which then sets
    no pragma; any other statement on that connection turns it on first, so a write of
    the dashboard's, or a transaction of peewee's, waits for another process's lock
    instead of failing at once."""
    with database.connection_context():
        sqlite_write([("INSERT INTO t VALUES (1)", [])])
        statements: list[str] = []
        database.connection().set_trace_callback(statements.append)
        sqlite_write([("INSERT INTO t VALUES (2)", [])])
        assert not [s for s in statements if "busy_timeout" in s], statements
        database.connection().set_trace_callback(None)

        with sqlite_lock_held(proxied, 0.5):  # another worker's recorder, writing
            started = time.monotonic()
            assert database.execute_sql("INSERT INTO t VALUES (3)").rowcount == 1
        assert time.monotonic() - started > 0.3, "the lock was not held: nothing was tested"

        sqlite_write([("INSERT INTO t VALUES (4)", [])])
        with sqlite_lock_held(proxied, 0.5), database.atomic():
            database.execute_sql("INSERT INTO t VALUES (5)")

        sqlite_write([("INSERT INTO t VALUES (6)", [])])
        assert database.execute_sql("PRAGMA busy_timeout").fetchone() == (5000,)
        rows = database.execute_sql("SELECT x FROM t ORDER BY x").fetchall()
    assert [x for (x,) in rows] == [1, 2, 3, 4, 5, 6]


def test_a_transaction_that_reads_then_writes_holds_against_a_commit_in_between(
    proxied: Path,
) -> None:
    """An admin change reads, then writes, in one transaction. Begun deferred, it read
    from a snapshot; another process's commit in between (a worker's recorder, the
    server-log writer) and its first write failed at once, "database is locked", busy
    handler or not. Begun IMMEDIATE, the other writer waits for it instead."""
    other = sqlite3.connect(proxied, timeout=0, isolation_level=None)  # another worker
    refused = False
    with database.connection_context():
        sqlite_write([("INSERT INTO t VALUES (1)", [])])  # leaves the busy handler off
        with database.atomic():
            (seen,) = database.execute_sql("SELECT max(x) FROM t").fetchone()
            try:
                other.execute("INSERT INTO t VALUES (100)")
            except sqlite3.OperationalError as exc:
                refused = "locked" in str(exc)
            database.execute_sql("INSERT INTO t VALUES (?)", (seen + 1,))
        other.execute("INSERT INTO t VALUES (100)")  # once committed, it goes in
        other.close()
        rows = database.execute_sql("SELECT x FROM t ORDER BY x").fetchall()
    assert refused, "the other writer got in between the read and the write"
    assert [x for (x,) in rows] == [1, 2, 100]


def test_a_write_offers_its_cpu_after_each_statement(
    proxied: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between a write's statements (and before its COMMIT) the thread running them
    yields its CPU, so that what woke on it meanwhile (a call's next step) runs first."""
    yields: list[int] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(1))
    with database.connection_context():
        sqlite_write([("INSERT INTO t VALUES (1)", []), ("INSERT INTO t VALUES (2)", [])])
        assert len(yields) == 2
        sqlite_write([("INSERT INTO t VALUES (3)", []), lambda results: [], ("SELECT 1", [])])
        assert len(yields) == 5


def test_a_background_job_a_deadlock_gave_up_leaves_the_database_reachable(
    db, database_url
) -> None:  # type: ignore[no-untyped-def]
    # A real deadlock (PostgreSQL's 40P01) in a background job marked the database
    # unreachable, as an outage does: it answered, to give one transaction up.
    import psycopg

    from gateway import db as gateway_db
    from tests.servers import pg_lock_awaited, wait_until

    if not gateway_db.is_postgres():
        pytest.skip("PostgreSQL's deadlocks")
    database.execute_sql("CREATE TABLE locked (id INTEGER PRIMARY KEY, x INTEGER)")
    database.execute_sql("INSERT INTO locked VALUES (1, 0), (2, 0)")
    gateway_db.mark_reachable(True)

    def job() -> None:
        with gateway_db.background(30), database.atomic():
            database.execute_sql("UPDATE locked SET x = 1 WHERE id = 1")
            database.execute_sql("UPDATE locked SET x = 1 WHERE id = 2")

    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute("UPDATE locked SET x = 2 WHERE id = 2")
        ran = gevent.spawn(job)
        wait_until(lambda: pg_lock_awaited(other))
        other.execute("UPDATE locked SET x = 2 WHERE id = 1")
        other.execute("COMMIT")
        ran.join(30)
    assert isinstance(ran.exception, gateway_db.Conflict), ran.exception
    assert ran.exception.reason == "deadlock"
    assert gateway_db.reachable()
