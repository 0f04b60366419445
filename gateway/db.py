"""The database handle: one proxy, opened from ``DATABASE_URL``, and its migrations.

SQLite (the embedded default) runs in WAL mode with a modest busy timeout; every
write is one short transaction with no cooperative I/O inside, because SQLite's busy
handler sleeps in C and would freeze the whole gevent worker (the recorder, which
writes all the time, waits for the lock in gevent instead, and does its SQLite work
beside the loop, in the hub's thread pool, where sqlite3 lets go of the GIL:
``sqlite_write``). Statements outside a transaction run beside the loop too, so neither a
dashboard's aggregate over a big table nor a write waiting for another process's lock
stops the worker's calls (``_SqliteDatabase``).
PostgreSQL goes through psycopg 3, which cooperates with gevent, from a small
per-worker pool. Connections belong to greenlets: peewee must be imported after
gevent patched ``threading`` (gunicorn's gevent worker does that before it loads the
app); ``init_app`` refuses to run otherwise, because greenlets would then share one
connection and silently mix their transactions.

Background jobs (cache refresh, heartbeats, record writes) run in ``background()``:
their own connection, a short connect timeout and a bound on the whole job, so a
database that is down or black-holed stalls no one; each outcome updates
``reachable()``, which lets the request path skip waiting on a database known down.
A request's use of PostgreSQL (the admin API, the dashboard, ``/api/usage``) is bounded
by ``DB_REQUEST_TIMEOUT`` a step (``bounded``): a server that stops answering on
connections it holds open (a paused VM, a partition that drops packets) makes a 503.
"""

from __future__ import annotations

import functools
import getpass
import logging
import os
import socket
import sqlite3
import ssl
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import gevent
import peewee
from flask import Flask, g
from gevent import monkey
from playhouse.migrations import Migration, Runner
from playhouse.pool import PooledPostgresqlDatabase

from gateway import offloop
from gateway.config import DEFAULTS, ROOT, default_database_url

log = logging.getLogger(__name__)
T = TypeVar("T")

database = peewee.DatabaseProxy()
MIGRATIONS = ROOT / "migrations"
# PostgreSQL advisory lock keys, one a job that runs in one instance at a time: each its
# own, or one job would wait for another's (a retention round lasts minutes).
MIGRATION_LOCK = 7_351_911  # one migrator at a time
RETENTION_LOCK = 7_351_912  # one retention round at a time (``retention``)
INIT_FILE_LOCK = 7_351_913  # one init file applied at a time (``initfile``)

# How often a writer looks again for SQLite's write lock another process holds
# (``sqlite_write``), in seconds: from the first retry to at most.
LOCK_POLL_MIN, LOCK_POLL_MAX = 0.001, 0.02
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "busy_timeout": 5000,
    "foreign_keys": 1,
    "cache_size": -16_000,
}


def open_database(
    url: str | None, connect_timeout: float | None = None, lock_timeout: float | None = None
) -> peewee.Database:
    """A peewee database for ``url`` (``sqlite:///path`` or ``postgresql://...``).

    ``lock_timeout`` (seconds, PostgreSQL): the server aborts a statement that waits
    longer for a lock. A background job gives up after ``DB_TIMEOUT`` and drops its
    connection, but the server does not notice a client gone while its statement waits
    for a lock: with a table locked (VACUUM FULL, ALTER TABLE, a LOCK TABLE), each
    retry left one more connection waiting, until PostgreSQL refused everyone (a
    helper's probe: 47 waiting after 60 s). Waits that are meant to be long (another
    instance's migration, ``alone``) lift it for themselves.
    """
    url = url or default_database_url()
    if connect_timeout is None:
        connect_timeout = float(DEFAULTS["DB_CONNECT_TIMEOUT"])  # type: ignore[arg-type]
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        # As SQLAlchemy and peewee read it: sqlite:///relative.db, sqlite:////abs.db
        path = unquote(parsed.path)[1:] or ":memory:"
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Not tied to the thread that opened it: ``beside_loop`` hands it to a pool
        # thread while the greenlet that owns it waits.
        return _SqliteDatabase(
            path,
            pragmas=SQLITE_PRAGMAS,
            autoconnect=False,
            check_same_thread=False,
            factory=_Connection,
        )
    if parsed.scheme in ("postgres", "postgresql"):
        return _PostgresqlDatabase(
            unquote(parsed.path.lstrip("/")) or "postgres",
            user=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            host=parsed.hostname,
            port=parsed.port,
            prefer_psycopg3=True,
            max_connections=64,
            stale_timeout=300,
            timeout=10,
            autoconnect=False,
            # libpq counts whole seconds and treats less than 2 as 2.
            connect_timeout=max(2, round(connect_timeout)),
            **(
                {"options": f"-c lock_timeout={round(lock_timeout * 1000)}"} if lock_timeout else {}
            ),
        )
    raise ValueError(f"unsupported DATABASE_URL scheme {parsed.scheme!r}")


# Greenlets whose use of PostgreSQL is bounded, and the bound in seconds: requests
# (``bounded``). Background jobs have a bound of their own on the whole job
# (``background``); SQLite is a local file.
_bounds: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
_request_timeout = float(DEFAULTS["DB_REQUEST_TIMEOUT"])  # type: ignore[arg-type]
_lock_timeout = float(DEFAULTS["DB_TIMEOUT"])  # type: ignore[arg-type]


class _PostgresqlDatabase(PooledPostgresqlDatabase):
    """PostgreSQL whose statements in a request are bounded (``_bounds``).

    A pooled connection opened before the server stopped answering (every process
    stopped, a paused VM, a partition that drops packets) took a request's query and
    waited for ever: the kernel still acknowledges, so neither TCP keepalive nor
    ``connect_timeout`` ends it, and ``statement_timeout`` is the stopped server's to
    enforce. The admin API, the dashboard and ``/api/usage`` hung, each request holding
    its greenlet and a pool slot. Past the bound the statement raises
    ``DatabaseTimeout`` (a 503 with Retry-After), and the connection, mid-query, is
    closed rather than given back to the pool. So are taking a connection from the pool
    (its lock, and peewee's ``SELECT 1`` that checks the connection it hands out) and
    making a new one.
    """

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        return self._bounded(super().execute_sql, sql, params)

    # peewee sends BEGIN, COMMIT and ROLLBACK on a cursor of its own, not through
    # ``execute_sql``: a transaction open when the server stopped answering (a listing's,
    # an admin write's) waited at its COMMIT for ever.
    def begin(self, isolation_level: Any = None) -> None:
        self._bounded(super().begin, isolation_level)

    def commit(self) -> None:
        self._bounded(super().commit)

    def rollback(self) -> None:
        self._bounded(super().rollback)

    def _bounded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return _within(fn, *args)
        except DatabaseTimeout:
            discard_connection()
            raise

    def manual_close(self) -> bool | None:
        """Close this greenlet's connection for good, never back to the pool."""
        if self.is_closed() or not self.in_transaction():
            return super().manual_close()
        # peewee will not close a connection inside a transaction: the pool's version took
        # it off the pool, failed, and left it open to the server until the transaction's
        # end (or the garbage collector). Closed here at once; peewee lets go of it when
        # the transaction ends (its ROLLBACK, past the bound, fails at once and lands in
        # ``manual_close`` again, outside the transaction).
        conn = self.connection()
        with self._pool_lock:
            self._in_use.pop(self.conn_key(conn), None)
            self._pool_available.notify()  # a slot is free for a request waiting for one
        self._close_raw(conn)
        return True

    def connect(self, reuse_if_open: bool = False) -> bool:
        # peewee's and the pool's locks may be held by a job checking a connection on
        # the hung server (for up to DB_TIMEOUT), or making one (DB_CONNECT_TIMEOUT):
        # the wait is bounded too.
        return _within(super().connect, reuse_if_open)

    def _is_closed(self, conn: Any) -> bool:
        try:
            return _within(super()._is_closed, conn)
        except BaseException:  # taken off the pool's heap: nobody else would close it
            # Not only this check's own bound: ``connect``'s timer, started first with the
            # same bound, fires first, and the connection was left open to the server.
            self._close_raw(conn)
            raise


def _within(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, bounded as this greenlet's statements are (``_bounds``); once one
    went unanswered, the request's others fail at once (an error page that reads the
    database too took the bound again, per statement)."""
    current = gevent.getcurrent()
    bound = _bounds.get(current)
    if bound is None:
        return fn(*args)
    if bound <= 0:
        raise DatabaseTimeout("the database did not answer this request")
    # The timer's own exception, not DatabaseTimeout, until it is out of ``fn``: peewee
    # takes any Exception in its check of a pooled connection for "closed", and went on
    # to the next connection, and the next.
    timer = gevent.Timeout(bound)
    timer.start()
    try:
        return fn(*args)
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        _bounds[current] = 0.0
        raise DatabaseTimeout(f"no answer within {bound:g} s") from None
    finally:
        timer.close()


class _Connection(sqlite3.Connection):
    """sqlite3's connection, knowing whether ``sqlite_write`` left its busy handler off
    (its writes wait for the lock in gevent; everything else in the handler, beside the
    loop)."""

    handler_off = False


class _SqliteDatabase(peewee.SqliteDatabase):
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
    def _handler_on(conn: _Connection | None) -> None:
        """The busy handler on again where ``sqlite_write`` left it off."""
        if conn is not None and conn.handler_off:
            conn.execute(f"PRAGMA busy_timeout = {SQLITE_PRAGMAS['busy_timeout']}")
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


def is_postgres() -> bool:
    """True when the proxy points at PostgreSQL."""
    return isinstance(database.obj, peewee.PostgresqlDatabase)


@contextmanager
def alone(lock: int) -> Iterator[None]:
    """A transaction that runs alone among those given the same ``lock``, in every
    process of every instance: one that reads before it writes (the init file) then
    reads what the one before it committed, never the state before it.

    PostgreSQL: a transaction-level advisory lock, taken first (each later statement
    reads what was committed before it began). SQLite: every transaction takes the
    write lock at its BEGIN already (``_SqliteDatabase.begin``).
    """
    with database.atomic():
        if is_postgres():
            database.execute_sql("SET LOCAL lock_timeout = 0")  # waits for the one before
            database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (lock,))
        yield


def init_app(app: Flask) -> None:
    """Open the configured database; close a request's connection when it ends.

    Requests connect only when they need to: the public API normally answers from
    per-worker caches without touching the database at all (see ``connection``).
    """
    global _request_timeout, _lock_timeout
    _check_greenlet_connections()
    _request_timeout = float(app.config["DB_REQUEST_TIMEOUT"])
    _lock_timeout = float(app.config["DB_TIMEOUT"])
    database.initialize(
        open_database(
            app.config["DATABASE_URL"],
            float(app.config["DB_CONNECT_TIMEOUT"]),
            lock_timeout=_lock_timeout,
        )
    )

    @app.teardown_request
    def _close(exc: BaseException | None) -> None:
        if g.pop("gateway_db_opened", False) and not database.is_closed():
            database.close()


def lock_timeout() -> float:
    """``DB_TIMEOUT``: the longest a wait for a lock may last (PostgreSQL's statements are
    aborted by the server past it; on SQLite, a search's wait for the write lock)."""
    return _lock_timeout


def connect() -> None:
    """Give the current request a connection, closed at teardown if it opened one."""
    if database.is_closed():
        database.connect()
        g.gateway_db_opened = True


@contextmanager
def bounded() -> Iterator[None]:
    """The block's use of PostgreSQL bounded by ``DB_REQUEST_TIMEOUT`` a step (taking a
    connection, each statement), and none once a step went unanswered: a request's,
    from before its session opens (the dashboard's session key may be read) to its
    answer."""
    current = gevent.getcurrent()
    outer = _bounds.get(current)  # a download's own, inside its request's: kept as it is
    if outer is None:
        _bounds[current] = _request_timeout
    try:
        yield
    finally:
        if outer is None:
            _bounds.pop(current, None)


@contextmanager
def connection() -> Iterator[None]:
    """A connection for the block: the greenlet's own if open, else one closed after."""
    opened = database.is_closed()
    if opened:
        database.connect()
    try:
        yield
    finally:
        if opened and not database.is_closed():
            database.close()


# A statement and its parameters, or a function of the rows the statements before it
# gave back that returns statements to run there and then (in the write's thread: pure
# and quick), whose own rows are not kept.
Statement = tuple[str, list[Any]] | Callable[[list[list[tuple]]], list[tuple[str, list[Any]]]]


def sqlite_write(statements: list[Statement]) -> list[list[tuple]]:
    """Run ``statements`` as one SQLite write transaction without stalling the worker;
    returns each statement's rows (``RETURNING``; none for a function).

    SQLite's busy handler sleeps in C: a worker whose writer finds the write lock taken
    (the other worker's recorder, writing a batch) would freeze with every call in it
    for as long. So the lock is asked for with no busy handler, and a refusal waits in
    gevent; the handler stays off for the connection's next write (a pair of pragmas a
    write was about 20 µs of its CPU), and any other statement on the connection turns
    it on again first (``_SqliteDatabase.execute_sql``). Once the lock is held, the
    statements and the COMMIT (where FTS5 flushes and merges its index) run in one
    call beside the loop (``beside_loop``): a batch of calls with long prompts is a few
    hundred milliseconds of SQLite's own work, and the worker's calls go on meanwhile.
    Nothing between BEGIN and COMMIT needs the loop, so a greenlet of this worker that
    waits for the lock meanwhile (in C, on the loop) cannot keep the transaction from
    ending. The caller bounds the whole (the recorder's timeout): cut short, the
    statement is interrupted and rolled back.
    """
    conn = database.connection()
    delay = LOCK_POLL_MIN
    with peewee.__exception_wrapper__:  # driver errors -> peewee's classes
        while (results := beside_loop(conn, _transaction, conn, statements)) is None:
            gevent.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX)
    return results


def _transaction(conn: _Connection, statements: list[Statement]) -> list[list[tuple]] | None:
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


class DatabaseTimeout(peewee.OperationalError):
    """The database did not answer within a background job's bound."""


# Errors that mean "the database is not there", as opposed to "it refused this": AWAY as
# a view meets them (peewee wraps the driver's), UNREACHABLE as a background job may.
AWAY = (peewee.OperationalError, peewee.InterfaceError)
UNREACHABLE = (*AWAY, OSError)
# What the admin API and the dashboard answer AWAY with: a 503 and this Retry-After
# (seconds: a database restart or failover takes about that).
AWAY_RETRY_AFTER = 5


class ReadOnly(peewee.OperationalError):
    """The database answers but takes no writes (a standby after a failover, or
    ``default_transaction_read_only``): for whoever writes, it is away."""


# peewee turns a driver's error into its own class by the error's class name. psycopg's
# ReadOnlySqlTransaction (SQLSTATE 25006) is an InternalError, which reads as "the
# database refused this", where it is the server refusing every write: mapped here, every
# query meets it as ReadOnly, an outage (records journaled, views a 503).
peewee.EXCEPTIONS["ReadOnlySqlTransaction"] = ReadOnly


_reachable = True


def reachable() -> bool:
    """False while the last background job found the database down."""
    return _reachable


def mark_reachable(ok: bool) -> None:
    """Note what the last attempt to use the database found."""
    global _reachable
    _reachable = ok


@contextmanager
def background(timeout: float) -> Iterator[None]:
    """This greenlet's own connection for one job, given up after ``timeout`` seconds.

    Raises ``DatabaseTimeout`` (an ``OperationalError``) when the bound is hit.
    """
    timer = gevent.Timeout(timeout, DatabaseTimeout(f"no answer within {timeout:g} s"))
    timer.start()
    opened = database.is_closed()  # else it is the caller's, left open for it
    try:
        if opened:
            database.connect()
        yield
    except UNREACHABLE:
        discard_connection()
        mark_reachable(False)
        raise
    else:
        mark_reachable(True)
    finally:
        timer.close()
        if opened and not database.is_closed():
            database.close()


def discard_connection() -> None:
    """Drop this greenlet's connection after a failure; the next use reconnects."""
    try:
        if isinstance(database.obj, PooledPostgresqlDatabase):
            database.obj.manual_close()  # never back to the pool: it may be mid-query
        elif not database.is_closed():
            database.close()
    except Exception:  # a broken connection may fail even to close; it is gone either way
        log.debug("closing a failed connection", exc_info=True)


def migrate(db: peewee.Database | None = None) -> list[str]:
    """Apply pending migrations; return the names applied.

    On the database itself, not the app's proxy of it: the migrations choose their
    statements by the database's class, and the proxy is neither SQLite's nor
    PostgreSQL's (a PostgreSQL database was given SQLite's statements).
    """
    db = db or database.obj
    with db.connection_context():
        if isinstance(db, peewee.PostgresqlDatabase):
            # Another instance's migration, and a table's readers and writers, are
            # waited for, however long (``open_database``'s lock_timeout is not for this).
            db.execute_sql("SET lock_timeout = 0")
            db.execute_sql("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            return Runner(db, directory=str(MIGRATIONS)).up()
        finally:
            if isinstance(db, peewee.PostgresqlDatabase):
                db.execute_sql("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
                db.execute_sql("RESET lock_timeout")


@functools.cache
def known_migrations() -> tuple[str, ...]:
    """This build's migrations by name, in order: the schema ``migrate`` brings a
    database to."""
    return tuple(m.name for m in Migration.load_directory(str(MIGRATIONS)))


# The first message of PostgreSQL's protocol a client may send (SSLRequest): the server
# answers it with one byte ('S' or 'N') before it asks for anything.
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def server_answers(timeout: float = 2.0) -> bool:
    """Whether the PostgreSQL server answers at all (TCP, or its Unix socket).

    Tells an outage (nothing there, nothing reachable, or a server that hangs) from a
    server that is there and refuses what it was asked (a wrong password, a database that
    does not exist), which psycopg's connection errors do not: both come without a
    SQLSTATE, and the server's words are in its own language. A connection alone is not
    an answer: the system of a hung server (a stopped process, a paused VM) still takes
    it. So the probe asks for the protocol's first reply, which comes before any sign-in.
    A server that answers only to say it takes no connections now (shutting down,
    starting up, in crash recovery: SQLSTATE class 57P, in its reply to the sign-in's
    first message) is away as well: it is not refusing this gateway, it is not serving.
    """
    params = database.obj.connect_params
    host, port = params.get("host") or "/var/run/postgresql", params.get("port") or 5432
    unix = host.startswith("/")
    try:
        if unix:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
        else:
            sock = socket.create_connection((host, port), timeout=timeout)
        with sock:
            if unix:
                sock.connect(f"{host}/.s.PGSQL.{port}")
            sock.sendall(_SSL_REQUEST)
            reply = sock.recv(1)
            if reply not in (b"N", b"S"):
                return bool(reply)
            return not _not_serving(sock, reply == b"S", params)
    except OSError:  # socket.timeout too
        return False


def _not_serving(sock: socket.socket, tls: bool, params: dict) -> bool:
    """Whether the server, asked to sign in, says it takes no connections now (57P...).

    ``sock`` has had the SSLRequest's answer (``tls``: it wants TLS, spoken here without
    checking its certificate: nothing but the error's code is read). Anything but an
    error of class 57P (a request for a password, another error, no answer) is a server
    that serves."""
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            sock = context.wrap_socket(sock)
        except ssl.SSLError:  # it answered, in a TLS this probe cannot speak
            return False
    user = params.get("user") or getpass.getuser()
    name = database.obj.database or user
    body = struct.pack("!i", 196608) + b"".join(  # protocol 3.0
        key.encode() + b"\0" + value.encode() + b"\0"
        for key, value in (("user", user), ("database", name))
    )
    sock.sendall(struct.pack("!i", len(body) + 5) + body + b"\0")
    head = _read(sock, 5)
    if len(head) < 5 or head[:1] != b"E":
        return False
    fields = _read(sock, struct.unpack("!i", head[1:])[0] - 4)
    for field in fields.split(b"\0"):
        if field[:1] == b"C":  # the SQLSTATE
            return field[1:].startswith(b"57P")
    return False


def _read(sock: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes (fewer only if the server closes first)."""
    data, size = b"", min(size, 65536)  # an error's fields are a few hundred bytes
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            break
        data += piece
    return data


def _check_greenlet_connections() -> None:
    """Refuse to run with peewee bound to real threads under a patched gevent."""
    if (
        monkey.is_module_patched("threading")
        and threading.local not in peewee._ConnectionLocal.__mro__
    ):
        raise RuntimeError(
            "peewee was imported before gevent patched threading: greenlets would share "
            "one database connection. Do not use preload_app or import the gateway in "
            "gunicorn.conf.py."
        )
