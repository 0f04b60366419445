"""SQLite as the gateway drives it: no statement of a worker stalls its event loop.

SQLite's work runs beside the loop, in the hub's thread pool, where sqlite3 lets go of
the GIL (``beside_loop``): every statement outside a transaction (``SqliteDatabase``),
and the recorder's write transactions whole (``write``), whose wait for another
process's write lock is spent in gevent, not in SQLite's busy handler, which sleeps in
C and would freeze every call of the worker. Inside a transaction peewee opens,
statements stay on the loop. ``db.open_database`` makes these connections;
``db.sqlite_write`` runs a write on the current one.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gevent
import peewee

from gateway import offloop

T = TypeVar("T")

# How often a writer looks again for SQLite's write lock another process holds
# (``write``), in seconds: from the first retry to at most.
LOCK_POLL_MIN, LOCK_POLL_MAX = 0.001, 0.02
PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "busy_timeout": 5000,
    "foreign_keys": 1,
    "cache_size": -16_000,
}


class Connection(sqlite3.Connection):
    """sqlite3's connection, knowing whether ``write`` left its busy handler off
    (its writes wait for the lock in gevent; everything else in the handler, beside the
    loop)."""

    handler_off = False


class SqliteDatabase(peewee.SqliteDatabase):
    """SQLite whose statements outside a transaction run beside the event loop.

    A dashboard page's aggregate over a big table is SQLite's work for hundreds of
    milliseconds, and a write outside a transaction that finds the lock taken (another
    worker's recorder writing a batch) waits for it in SQLite's busy handler, in C: on
    the loop, every call in the worker would wait that long. In autocommit mode a
    statement takes what it needs and lets go of it by itself, so it may run in a
    thread. Inside a transaction everything stays on the loop: one that holds the write
    lock must not let the loop go to a greenlet that would then wait for that lock in
    the busy handler on the loop, while the transaction waits for the loop to finish.
    """

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        conn = self._state.conn
        self._handler_on(conn)
        if conn is None or conn.in_transaction or not offloop.available() or not _statement(sql):
            return super().execute_sql(sql, params)
        self._log_query(sql, params)
        with peewee.__exception_wrapper__:
            return beside_loop(conn, _Fetched, conn, sql, params or ())

    def begin(self, lock_type: str | None = None) -> None:
        """A transaction (``atomic()``) takes the write lock at its BEGIN.

        SQLite's default, a deferred BEGIN, reads from a snapshot and asks for the lock
        at the first write; if another connection committed in between (a worker's
        recorder, the server-log writer), SQLite refuses at once with "database is
        locked", without its busy handler: a read-then-write (an admin change, the
        init file) failed whenever it overlapped a commit. With the lock taken first,
        it waits for the other writer in the busy handler instead.
        """
        self._handler_on(self._state.conn)  # peewee's BEGIN bypasses ``execute_sql``
        super().begin(lock_type or "IMMEDIATE")

    @staticmethod
    def _handler_on(conn: Connection | None) -> None:
        """The busy handler on again where ``write`` left it off."""
        if conn is not None and conn.handler_off:
            conn.execute(f"PRAGMA busy_timeout = {PRAGMAS['busy_timeout']}")
            conn.handler_off = False


_STATEMENTS = ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "REPLACE")


def _statement(sql: str) -> bool:
    """A query or a change of rows, as opposed to BEGIN, COMMIT, SAVEPOINT, PRAGMA or
    DDL, which stay on the loop (they change the connection's state, or are rare)."""
    return sql.lstrip()[:7].upper().startswith(_STATEMENTS)


class _Fetched:
    """A cursor's answer, fetched whole in the pool thread (the steps are SQLite's
    work too); reads like the cursor it was for peewee."""

    def __init__(self, conn: sqlite3.Connection, sql: str, params: Any) -> None:
        cursor = conn.execute(sql, params)
        self._rows = cursor.fetchall()
        self.description = cursor.description
        self.rowcount, self.lastrowid = cursor.rowcount, cursor.lastrowid
        self._at = 0

    def fetchone(self) -> tuple | None:
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchmany(self, size: int = 1) -> list[tuple]:
        rows = self._rows[self._at : self._at + size]
        self._at += len(rows)
        return rows

    def fetchall(self) -> list[tuple]:
        rows = self._rows[self._at :]
        self._at = len(self._rows)
        return rows

    def __iter__(self) -> Iterator[tuple]:
        while (row := self.fetchone()) is not None:
            yield row

    def close(self) -> None:
        self._rows = []


def beside_loop(conn: Any, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, a call into SQLite on ``conn``, run in the hub's thread pool.

    sqlite3 lets go of the GIL while SQLite works, so the worker's other greenlets run
    meanwhile; this greenlet waits for the answer. If it is interrupted while it waits
    (a ``Timeout``, a kill), the statement is interrupted too, and waited for, before
    the exception goes on: nothing else may use ``conn`` while the thread does.
    Outside a gevent worker's main thread (a script, a test without patching), it
    simply calls ``work``. The wait survives a lost wake-up from the pool (``offloop``).
    """
    if not isinstance(conn, sqlite3.Connection) or not offloop.available():
        return work(*args)
    return offloop.run(work, args, "a SQLite task", cancel=conn.interrupt)


# A statement and its parameters, or a function of the rows the statements before it
# gave back that returns statements to run there and then (in the write's thread: pure
# and quick), whose own rows are not kept.
Statement = tuple[str, list[Any]] | Callable[[list[list[tuple]]], list[tuple[str, list[Any]]]]


def write(conn: Connection, statements: list[Statement]) -> list[list[tuple]]:
    """Run ``statements`` on ``conn`` as one write transaction without stalling the worker;
    returns each statement's rows (``RETURNING``; none for a function).

    SQLite's busy handler sleeps in C: a worker whose writer finds the write lock taken
    (the other worker's recorder, writing a batch) would freeze with every call in it
    for as long. So the lock is asked for with no busy handler, and a refusal waits in
    gevent; the handler stays off for the connection's next write (a pair of pragmas a
    write was about 20 µs of its CPU), and any other statement on the connection turns
    it on again first (``SqliteDatabase.execute_sql``). Once the lock is held, the
    statements and the COMMIT (where FTS5 flushes and merges its index) run in one
    call beside the loop (``beside_loop``): a batch of calls with long prompts is a few
    hundred milliseconds of SQLite's own work, and the worker's calls go on meanwhile.
    Nothing between BEGIN and COMMIT needs the loop, so a greenlet of this worker that
    waits for the lock meanwhile (in C, on the loop) cannot keep the transaction from
    ending. The caller bounds the whole (the recorder's timeout): cut short, the
    statement is interrupted and rolled back.
    """
    delay = LOCK_POLL_MIN
    with peewee.__exception_wrapper__:  # driver errors -> peewee's classes
        while (results := beside_loop(conn, _transaction, conn, statements)) is None:
            gevent.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX)
    return results


def _transaction(conn: Connection, statements: list[Statement]) -> list[list[tuple]] | None:
    """BEGIN IMMEDIATE if the lock is free now (else None), the statements, COMMIT.

    After each statement (a function's statements count as one) the thread offers its
    CPU (``sched_yield``) to whatever is waiting to run on it. Without that, a batch's
    statements ran back to back for a millisecond or more, and what woke on that CPU
    meanwhile (the worker's loop with a call's next step, the client, the upstream)
    could wait for all of them: with it, a JSON call's p99 at one client came down to
    about the floor's (issue 11). With nothing else to run, the yield is a system call
    of about a microsecond.
    """
    if not conn.handler_off:
        conn.execute("PRAGMA busy_timeout = 0")
        conn.handler_off = True
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return None
        raise
    try:
        results: list[list[tuple]] = []
        for statement in statements:
            if callable(statement):  # statements made of what the ones before gave back
                for sql, params in statement(results):
                    conn.execute(sql, params)
                results.append([])
            else:
                sql, params = statement
                results.append(conn.execute(sql, params).fetchall())
            os.sched_yield()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # an interrupted write has rolled back already
            conn.execute("ROLLBACK")
        raise
    return results
