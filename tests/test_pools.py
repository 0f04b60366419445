"""The suite's pool release: a greenlet mid-query sees an error, the process lives on."""

import gevent
import peewee
import pytest

from gateway.db import open_database
from tests import pools
from tests.conftest import PG_URL


@pytest.mark.skipif(not PG_URL, reason="PostgreSQL only: SQLite has no pool")
def test_a_greenlet_mid_query_when_the_pool_is_released_gets_an_error() -> None:
    db = open_database(PG_URL)
    started = gevent.event.Event()

    def query() -> None:
        with db.connection_context():
            started.set()
            db.execute_sql("SELECT pg_sleep(5)")

    idle = gevent.spawn(lambda: db.execute_sql("SELECT 1"))  # leaves one in the pool
    idle.join(5)
    busy = gevent.spawn(query)
    # Woken in the same loop turn in which ``busy`` starts waiting on its socket, before
    # libev hands that socket to epoll: the moment a closed descriptor aborts the process.
    started.wait(5)
    pools.release(db)  # close_all() here: "libev: I/O watcher with invalid fd", SIGABRT
    busy.join(5)
    assert busy.dead and isinstance(busy.exception, peewee.OperationalError)
    assert not db._in_use and not db._connections
