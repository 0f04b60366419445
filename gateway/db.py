"""The database handle: one proxy, opened from ``DATABASE_URL``, and its migrations.

SQLite (the embedded default) runs in WAL mode with a modest busy timeout; every
write is one short transaction with no cooperative I/O inside, because SQLite's busy
handler sleeps in C and would freeze the whole gevent worker: ``sqlitedb`` runs
SQLite's work beside the loop, statements outside a transaction and the recorder's
writes (``sqlite_write``, which waits for another process's lock in gevent).
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
import logging
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

from gateway import sqlitedb
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
        # Not tied to the thread that opened it: ``sqlitedb.beside_loop`` hands it to a pool
        # thread while the greenlet that owns it waits.
        return sqlitedb.SqliteDatabase(
            path,
            pragmas=sqlitedb.PRAGMAS,
            autoconnect=False,
            check_same_thread=False,
            factory=sqlitedb.Connection,
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
    write lock at its BEGIN already (``sqlitedb.SqliteDatabase.begin``).
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


def sqlite_write(statements: list[sqlitedb.Statement]) -> list[list[tuple]]:
    """Run ``statements`` as one SQLite write transaction on this greenlet's connection,
    without stalling the worker (``sqlitedb.write``); each statement's rows."""
    return sqlitedb.write(database.connection(), statements)


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


# Runs again of a transaction PostgreSQL gave up for another (``Conflict.retryable``):
# an admin view's, a batch of records'.
CONFLICT_RETRIES = 2


class Conflict(peewee.OperationalError):
    """PostgreSQL gave this transaction up for another's sake: a deadlock's victim
    (40P01), a serialization failure (40001), or a row waited for past ``lock_timeout``
    (55P03). The database answers: this is no outage, and marks it unreachable nowhere.
    Rolled back whole, a transaction given up for a deadlock or a serialization failure
    may be run again (``retryable``); a lock timeout would only wait as long again."""

    REASONS = {"40P01": "deadlock", "40001": "serialization failure", "55P03": "lock timeout"}

    @property
    def reason(self) -> str:
        """What PostgreSQL gave the transaction up for, in a word or two."""
        driver_error = getattr(self, "orig", None)  # psycopg's, which peewee wrapped
        return self.REASONS.get(getattr(driver_error, "sqlstate", None), "conflict")

    @property
    def retryable(self) -> bool:
        return self.reason in ("deadlock", "serialization failure")


# An OperationalError still, so that whoever takes any for "away" stays safe (the
# recorder journals what it could not write); those that declare an outage tell it apart.
for _name in ("DeadlockDetected", "SerializationFailure", "LockNotAvailable"):
    peewee.EXCEPTIONS[_name] = Conflict


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
    except UNREACHABLE as exc:
        discard_connection()
        if not isinstance(exc, Conflict):  # it answered, to give a transaction up
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
