"""What writing a call's record costs, as the completions table grows.

Writes synthetic finished calls (``bench/recorder.py``'s: a two-message prompt, an
answer, usage, one attempt) the way the recorder does (``recorder.write_rows``, in
batches of ``--batch``) into a fresh database: a SQLite file in a temporary folder, or
a new database on the PostgreSQL server given (dropped afterwards). Every ``--step``
records it measures ``--sample`` batches: the CPU time of this process per record (all
its threads: on SQLite the statements run in the hub's pool thread, and the full-text
index's share is counted, indexed in lots as the recorder does), the wall time per
record and, on a PostgreSQL server on this machine, the server's own CPU per record
(the connection's backend process, from ``/proc``). Prints one line per table size.
``--keys N`` spreads the calls over N gateway keys at random (an index on the key then
takes each row in a different place, as with a team's many keys). ``--random-uids``
gives the calls random (version 4) uids, as the gateway did before 2026-12-03, to
compare with its time-ordered ones (version 7).

Run: ``python bench/record_write.py [--rows 100000] [--postgres URL] [--keys N]
[--random-uids]``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import load_average, machine  # noqa: E402
from bench.run import database  # noqa: E402


def calls(key_ids: list[int], count: int, random_uids: bool) -> list[dict]:
    """Snapshots of ``count`` finished calls, each of one of ``key_ids`` at random, as
    the recorder takes them."""
    from bench.recorder import _call

    try:
        from gateway.callrows import snapshot
    except ImportError:  # builds before callrows.py: the recorder took the snapshots
        from gateway.recorder import snapshot  # type: ignore[no-redef]

    rows = []
    for _ in range(count):
        exchange = _call(random.choice(key_ids))
        if random_uids:
            exchange.uid = uuid.uuid4().hex
        rows.append(snapshot(exchange))
    return rows


def indexing() -> tuple[int, Callable[[], object]]:
    """How the recorder indexes the text due: every so many records, with what. Builds
    before indexdue.py had both in the recorder; before 2026-12-04, neither (0, nothing)."""
    try:
        from gateway.indexdue import INDEX_AT, index_all_due
    except ImportError:
        from gateway import recorder

        return getattr(recorder, "INDEX_AT", 0), getattr(recorder, "index_all_due", lambda: None)
    return INDEX_AT, index_all_due


def measure(
    key_ids: list[int], batches: int, size: int, random_uids: bool
) -> tuple[float, float, float | None]:
    """CPU and wall microseconds per record over ``batches`` batches of ``size``, the
    full-text index's share included: on SQLite the text due is indexed as the recorder
    does, every ``INDEX_AT`` records, and what is left at the end (builds from before
    2026-12-04 indexed in each write, and have no ``index_all_due``). Third: on a
    PostgreSQL server on this machine, its own CPU per record (the connection's backend
    process), else None."""
    from gateway.recorder import write_rows

    index_at, index = indexing()
    server = _server_cpu()
    cpu = wall = 0.0
    due = 0
    server_before = server()
    for i in range(batches):
        rows = calls(key_ids, size, random_uids)  # not counted: the snapshots are the calls'
        started, used = time.perf_counter(), time.process_time()
        write_rows(rows, touch_keys=set())
        due += size
        if due >= index_at or i == batches - 1:
            index()
            due = 0
        cpu += time.process_time() - used
        wall += time.perf_counter() - started
    server_after = server()
    records = batches * size
    used_by_server = (
        None
        if server_before is None or server_after is None
        else (server_after - server_before) / records * 1e6
    )
    return cpu / records * 1e6, wall / records * 1e6, used_by_server


def _server_cpu() -> Callable[[], float | None]:
    """A reading of the CPU seconds of this connection's PostgreSQL backend, when the
    server runs on this machine (its ``/proc``); readings of None otherwise."""
    from gateway.db import database, is_postgres

    if not is_postgres():
        return lambda: None
    (pid,) = database.execute_sql("SELECT pg_backend_pid()").fetchone()
    stat = Path(f"/proc/{pid}/schedstat")

    def reading() -> float | None:
        try:
            return int(stat.read_text().split()[0]) / 1e9
        except (OSError, ValueError):  # another machine's, or gone
            return None

    return reading


class _Timed:
    """A SQLite connection whose statements are timed (thread CPU, by their first words)
    into ``spent``: what ``sqlitedb._transaction`` is handed under ``--statements``."""

    def __init__(self, conn: Any, spent: dict[str, list[float]]) -> None:
        self._conn, self._spent = conn, spent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:  # the connection's own state (``sqlitedb.Connection.handler_off``)
            setattr(self._conn, name, value)

    def execute(self, sql: str, params: Any = ()) -> _Fetched:
        used = time.thread_time()
        rows = self._conn.execute(sql, params).fetchall()  # RETURNING rows come as it steps
        name = " ".join(sql.split("(")[0].split()[:5])
        self._spent.setdefault(name, []).append(time.thread_time() - used)
        return _Fetched(rows)


class _Fetched:
    def __init__(self, rows: list) -> None:
        self._rows = rows

    def fetchall(self) -> list:
        return self._rows


@contextmanager
def timed_statements() -> Iterator[dict[str, list[float]]]:
    """Within the block, every SQLite write's statements are timed one by one (the
    write's COMMIT is where FTS5 flushes and merges; an ``UPDATE`` after an FTS insert
    is where it flushes its terms). Yields the times by statement; ``""`` counts writes."""
    from gateway import sqlitedb

    spent: dict[str, list[float]] = {}
    transaction = sqlitedb._transaction

    def timed(conn: Any, statements: list) -> Any:
        spent.setdefault("", []).append(0.0)
        return transaction(_Timed(conn, spent), statements)

    sqlitedb._transaction = timed
    try:
        yield spent
    finally:
        sqlitedb._transaction = transaction


def statements_table(spent: dict[str, list[float]]) -> str:
    """Each statement's CPU per write and how often a write runs it, the most costly first."""
    writes = len(spent.get("", [])) or 1
    lines = ["| statement | µs per write | times per write |", "|---|---|---|"]
    for name, times in sorted(spent.items(), key=lambda item: -sum(item[1])):
        if name:
            lines.append(
                f"| {name} | {sum(times) / writes * 1e6:.1f} | {len(times) / writes:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="records written in all")
    parser.add_argument("--step", type=int, default=25_000, help="records between measurements")
    parser.add_argument("--sample", type=int, default=200, help="batches per measurement")
    parser.add_argument("--batch", type=int, default=25, help="records per write")
    parser.add_argument("--postgres", metavar="URL", help="use a fresh database on this server")
    parser.add_argument("--random-uids", action="store_true", help="version 4 uids, as before")
    parser.add_argument("--keys", type=int, default=1, help="gateway keys the calls spread over")
    parser.add_argument(
        "--statements", action="store_true", help="SQLite: time each statement of the writes"
    )
    args = parser.parse_args()

    from gateway.db import database as db
    from gateway.db import migrate, open_database
    from gateway.models import ApiKey
    from gateway.recorder import write_rows

    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}; load average {load_average()}")
    uids = "random (v4)" if args.random_uids else "time-ordered (v7)"
    print(
        f"{'postgresql' if args.postgres else 'sqlite'}, {uids} uids, batches of {args.batch},"
        f" {args.keys} key(s)"
    )
    print(
        "| records in the table | CPU per record | wall per record | PostgreSQL's CPU per record |"
        "\n|---|---|---|---|"
    )
    try:
        with database(args.postgres, tmp) as url:
            db.initialize(open_database(url))
            migrate(db.obj)
            db.connect()
            key_ids = [
                ApiKey.create(key_hash=uuid.uuid4().hex * 2, key_hint="sk-…bench").id
                for _ in range(args.keys)
            ]
            gc.collect()
            gc.freeze()  # as a worker does after loading the app
            written = 0
            for target in range(0, args.rows + 1, args.step):
                while written < target:  # fill the table up to the next measurement
                    chunk = min(target - written, 1000)
                    write_rows(calls(key_ids, chunk, args.random_uids), touch_keys=set())
                    written += chunk
                indexing()[1]()  # the filling's text too
                timing = args.statements and not args.postgres
                with timed_statements() if timing else nullcontext(None) as spent:
                    cpu, wall, server = measure(key_ids, args.sample, args.batch, args.random_uids)
                theirs = "" if server is None else f"{server:.0f} µs"
                print(f"| {written:,} | {cpu:.0f} µs | {wall:.0f} µs | {theirs} |", flush=True)
                if spent is not None:
                    print(statements_table(spent), flush=True)
                written += args.sample * args.batch
            db.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
