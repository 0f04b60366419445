"""The database handle: one proxy, opened from ``DATABASE_URL``, and its migrations.

SQLite (the embedded default) runs in WAL mode with a modest busy timeout; every
write is one short transaction with no cooperative I/O inside, because SQLite's busy
handler sleeps in C and would freeze the whole gevent worker (the recorder, which
writes all the time, waits for the lock in gevent instead: ``write_transaction``).
PostgreSQL goes through psycopg 3, which cooperates with gevent, from a small
per-worker pool. Connections belong to greenlets: peewee must be imported after
gevent patched ``threading`` (gunicorn's gevent worker does that before it loads the
app); ``init_app`` refuses to run otherwise, because greenlets would then share one
connection and silently mix their transactions.

Background jobs (cache refresh, heartbeats, record writes) run in ``background()``:
their own connection, a short connect timeout and a bound on the whole job, so a
database that is down or black-holed stalls no one; each outcome updates
``reachable()``, which lets the request path skip waiting on a database known down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import gevent
import peewee
from flask import Flask, g
from playhouse.migrations import Runner
from playhouse.pool import PooledPostgresqlDatabase

from gateway.config import DEFAULTS, ROOT, default_database_url

log = logging.getLogger(__name__)

database = peewee.DatabaseProxy()
MIGRATIONS = ROOT / "migrations"
_MIGRATION_LOCK = 7_351_911  # pg_advisory_lock key: one migrator at a time

# How often a writer looks again for SQLite's write lock another process holds
# (``write_transaction``), in seconds: from the first retry to at most.
LOCK_POLL_MIN, LOCK_POLL_MAX = 0.001, 0.02
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "busy_timeout": 5000,
    "foreign_keys": 1,
    "cache_size": -16_000,
}


def open_database(url: str | None, connect_timeout: float | None = None) -> peewee.Database:
    """A peewee database for ``url`` (``sqlite:///path`` or ``postgresql://...``)."""
    url = url or default_database_url()
    if connect_timeout is None:
        connect_timeout = float(DEFAULTS["DB_CONNECT_TIMEOUT"])  # type: ignore[arg-type]
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        # As SQLAlchemy and peewee read it: sqlite:///relative.db, sqlite:////abs.db
        path = unquote(parsed.path)[1:] or ":memory:"
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return peewee.SqliteDatabase(path, pragmas=SQLITE_PRAGMAS, autoconnect=False)
    if parsed.scheme in ("postgres", "postgresql"):
        return PooledPostgresqlDatabase(
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
        )
    raise ValueError(f"unsupported DATABASE_URL scheme {parsed.scheme!r}")


def is_postgres() -> bool:
    """True when the proxy points at PostgreSQL."""
    return isinstance(database.obj, peewee.PostgresqlDatabase)


def init_app(app: Flask) -> None:
    """Open the configured database; close a request's connection when it ends.

    Requests connect only when they need to: the public API normally answers from
    per-worker caches without touching the database at all (see ``connection``).
    """
    _check_greenlet_connections()
    database.initialize(
        open_database(app.config["DATABASE_URL"], float(app.config["DB_CONNECT_TIMEOUT"]))
    )

    @app.teardown_request
    def _close(exc: BaseException | None) -> None:
        if g.pop("gateway_db_opened", False) and not database.is_closed():
            database.close()


def connect() -> None:
    """Give the current request a connection, closed at teardown if it opened one."""
    if database.is_closed():
        database.connect()
        g.gateway_db_opened = True


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


@contextmanager
def write_transaction() -> Iterator[None]:
    """A transaction for a background writer; on SQLite its lock is waited for in gevent.

    SQLite's busy handler sleeps in C: a worker whose writer finds the write lock taken
    (the other worker's recorder, writing a batch for 10-20 ms) would freeze with every
    call in it for as long. Here the lock is taken first (``BEGIN IMMEDIATE``) with no
    busy handler, and a refusal waits in gevent, so the worker's calls run meanwhile.
    Once the lock is held nothing inside waits for another writer. The caller bounds
    the wait (``background``, or the recorder's own timeout).
    """
    if not isinstance(database.obj, peewee.SqliteDatabase):
        with database.atomic():
            yield
        return
    with contextlib.ExitStack() as stack:
        delay = LOCK_POLL_MIN
        while True:
            database.execute_sql("PRAGMA busy_timeout = 0")
            try:
                stack.enter_context(database.atomic(lock_type="IMMEDIATE"))
                break
            except peewee.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
            finally:
                database.execute_sql(f"PRAGMA busy_timeout = {SQLITE_PRAGMAS['busy_timeout']}")
            gevent.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX)
        yield


class DatabaseTimeout(peewee.OperationalError):
    """The database did not answer within a background job's bound."""


# Errors that mean "the database is not there", as opposed to "it refused this".
UNREACHABLE = (peewee.OperationalError, peewee.InterfaceError, OSError)
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
    """Apply pending migrations; return the names applied."""
    db = db or database
    with db.connection_context():
        if isinstance(db, peewee.PostgresqlDatabase):
            db.execute_sql("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            return Runner(db, directory=str(MIGRATIONS)).up()
        finally:
            if isinstance(db, peewee.PostgresqlDatabase):
                db.execute_sql("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))


def _check_greenlet_connections() -> None:
    """Refuse to run with peewee bound to real threads under a patched gevent."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a hard dependency
        return
    if (
        monkey.is_module_patched("threading")
        and threading.local not in peewee._ConnectionLocal.__mro__
    ):
        raise RuntimeError(
            "peewee was imported before gevent patched threading: greenlets would share "
            "one database connection. Do not use preload_app or import the gateway in "
            "gunicorn.conf.py."
        )
