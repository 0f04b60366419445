"""The database handle: SQLite's work beside the event loop."""

from __future__ import annotations

import itertools
import sqlite3
import time
from pathlib import Path

import gevent
import pytest

from gateway.db import beside_loop

# Counts to a billion: many seconds of SQLite's own work, unless interrupted.
_LONG = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000000)"
    " SELECT count(*) FROM n"
)


def _fetch(conn: sqlite3.Connection, sql: str) -> list[tuple]:
    return conn.execute(sql).fetchall()


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "db.sqlite", check_same_thread=False)


def test_a_statement_runs_while_the_loop_goes_on(conn: sqlite3.Connection) -> None:
    ticks: list[float] = []

    def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.002)

    ticker = gevent.spawn(tick)
    gevent.sleep(0.01)
    started = time.monotonic()
    sql = _LONG.replace("1000000000", "3000000")
    assert beside_loop(conn, _fetch, conn, sql) == [(3000000,)]
    took = time.monotonic() - started
    gevent.sleep(0.01)  # a tick after the statement, or a frozen loop would show no gap
    ticker.kill()
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert took > 0.2, f"{took:.3f} s: too short to show anything"
    assert max(gaps) < 0.05, f"the loop stopped for {max(gaps):.3f} s of {took:.3f} s"


def test_a_wait_cut_short_interrupts_the_statement_and_leaves_the_connection_usable(
    conn: sqlite3.Connection,
) -> None:
    started = time.monotonic()
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.2):
        beside_loop(conn, _fetch, conn, _LONG)
    # Not left running in its thread: the connection is free again at once.
    assert time.monotonic() - started < 1.0
    assert beside_loop(conn, _fetch, conn, "SELECT 1") == [(1,)]


def test_an_error_in_the_statement_reaches_the_caller(conn: sqlite3.Connection) -> None:
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        beside_loop(conn, _fetch, conn, "SELECT * FROM nowhere")
