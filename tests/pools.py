"""Letting go of a test's PostgreSQL pool without aborting the test process.

Closing a connection whose socket another greenlet is waiting on (a heartbeat or a
server-log write that started just before the test ended) makes libev abort the
whole process: "I/O watcher with invalid fd found in epoll_ctl". So a connection some
other greenlet has checked out is shut down, not closed: that greenlet's wait ends
with an error and it discards the connection itself, as after any database failure.
"""

from __future__ import annotations

import os
import socket

import peewee
from playhouse.pool import PooledPostgresqlDatabase


def release(db: peewee.Database) -> None:
    """Close ``db``'s idle connections and this greenlet's; shut down the others'."""
    if not isinstance(db, PooledPostgresqlDatabase):
        return
    db.close()  # this greenlet's own, back to the pool
    with db._pool_lock:
        db.close_idle()
        in_use, db._in_use = db._in_use, {}
    for pooled in in_use.values():
        _shut_down(pooled.connection)


def _shut_down(conn: object) -> None:
    try:
        fd = conn.pgconn.socket  # type: ignore[attr-defined]
    except Exception:
        return  # closed already
    dup = socket.socket(fileno=os.dup(fd))
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more
    finally:
        dup.close()  # the copy only: the owner's descriptor stays valid until it closes it
