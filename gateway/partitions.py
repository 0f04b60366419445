"""The monthly partitions of ``completions`` on PostgreSQL: made ahead, dropped when old.

``migrations/0007_partitions`` made the table partitioned by ``created_at``; from then
on the retention job (``retention.py``) calls ``create_ahead`` so that this month and
the next ``MONTHS_AHEAD`` have their partition, and ``drop_before`` so that a month
wholly older than the retention goes in one ``DROP TABLE``. A row whose month has no
partition lands in ``completions_default`` and is never lost; when its month's
partition is made later, the rows the default holds for it are moved in, in the same
transaction.

Partition DDL needs a short exclusive lock on the parent table, which every write of
the recorder would queue behind: each statement runs with ``lock_timeout``
(``LOCK_TIMEOUT_MS``) and gives up rather than wait; the next run tries again (the
months are made weeks ahead, so there is time). Nothing here runs on SQLite.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime

from gateway.db import database, is_postgres

log = logging.getLogger(__name__)

MONTHS_AHEAD = 2
LOCK_TIMEOUT_MS = 200
DEFAULT = "completions_default"
_BOUND = re.compile(r"FROM \((.+?)\) TO \((.+?)\)")


@dataclass(frozen=True)
class Partition:
    """One partition: rows with ``start <= created_at < end`` (None: unbounded)."""

    name: str
    start: datetime | None
    end: datetime | None
    default: bool = False

    def covers(self, when: datetime) -> bool:
        return (
            not self.default
            and (self.start is None or self.start <= when)
            and (self.end is None or when < self.end)
        )


def month(when: datetime, ahead: int = 0) -> datetime:
    """The first instant of ``when``'s month, ``ahead`` months later."""
    index = when.year * 12 + when.month - 1 + ahead
    return datetime(index // 12, index % 12 + 1, 1)


def name(start: datetime) -> str:
    """The partition of the month beginning at ``start``."""
    return f"completions_y{start.year:04d}m{start.month:02d}"


def parse_bound(text: str) -> tuple[datetime | None, datetime | None] | None:
    """``FOR VALUES FROM (...) TO (...)`` as (start, end); None for ``DEFAULT``."""
    found = _BOUND.search(text)
    if found is None:
        return None

    def value(literal: str) -> datetime | None:
        literal = literal.strip()
        if literal.upper() in ("MINVALUE", "MAXVALUE"):
            return None
        return datetime.fromisoformat(literal.strip("'"))

    return value(found.group(1)), value(found.group(2))


def partitioned() -> bool:
    """True when ``completions`` is a partitioned table (PostgreSQL after 0007)."""
    if not is_postgres():
        return False
    cursor = database.execute_sql(
        "SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass('completions')"
    )
    return cursor.fetchone() is not None


def partitions() -> list[Partition]:
    """The partitions of ``completions``, oldest first, the default last."""
    rows = database.execute_sql(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'completions'::regclass"
    ).fetchall()
    found = []
    for relname, bound in rows:
        parsed = parse_bound(bound)
        if parsed is None:
            found.append(Partition(relname, None, None, default=True))
        else:
            found.append(Partition(relname, *parsed))
    return sorted(found, key=lambda p: (p.default, p.start or datetime.min))


def create_ahead(now: datetime) -> list[str]:
    """Make the partitions of this month and the next ``MONTHS_AHEAD``; return their names."""
    made = []
    for ahead in range(MONTHS_AHEAD + 1):
        start = month(now, ahead)
        if any(p.covers(start) for p in partitions()):
            continue
        try:
            _create(start, month(start, 1))
        except Exception as exc:
            if not _lock_busy(exc):
                raise
            log.info("partitions: %s not made now (the table is busy); next run", name(start))
            continue
        made.append(name(start))
    if made:
        log.info("partitions: made %s", ", ".join(made))
    return made


def drop_before(cutoff: datetime) -> list[str]:
    """Drop every partition whose rows are all older than ``cutoff``; return their names."""
    dropped = []
    for part in partitions():
        if part.default or part.end is None or part.end > cutoff:
            continue
        try:
            with database.atomic():
                _lock_timeout()
                database.execute_sql(f'DROP TABLE "{part.name}"')
        except Exception as exc:
            if not _lock_busy(exc):
                raise
            log.info("partitions: %s not dropped now (the table is busy); next run", part.name)
            continue
        dropped.append(part.name)
    if dropped:
        log.info("partitions: dropped %s (older than the retention)", ", ".join(dropped))
    return dropped


def _create(start: datetime, end: datetime) -> None:
    # DDL takes no parameters: the bounds are dates computed here.
    bounds = f"created_at >= '{start:%Y-%m-%d}' AND created_at < '{end:%Y-%m-%d}'"
    with database.atomic():
        _lock_timeout()
        stray = database.execute_sql(f"SELECT EXISTS (SELECT 1 FROM {DEFAULT} WHERE {bounds})")
        moving = stray.fetchone()[0]
        columns = ", ".join(_columns())
        if moving:  # the default partition may not keep rows the new partition covers
            # Everyone waits (lock_timeout bounds our wait): no write may land on a row
            # between its copy and its move, nor hold a lock the DDL below would need.
            database.execute_sql("LOCK TABLE completions IN ACCESS EXCLUSIVE MODE")
            database.execute_sql(
                f"CREATE TEMPORARY TABLE gateway_moving ON COMMIT DROP AS"
                f" SELECT {columns} FROM {DEFAULT} WHERE {bounds}"
            )
            database.execute_sql(f"DELETE FROM {DEFAULT} WHERE {bounds}")
        database.execute_sql(
            f'CREATE TABLE "{name(start)}" PARTITION OF completions'
            f" FOR VALUES FROM ('{start:%Y-%m-%d}') TO ('{end:%Y-%m-%d}')"
        )
        if moving:
            database.execute_sql(
                f"INSERT INTO completions ({columns}) SELECT {columns} FROM gateway_moving"
            )


def _columns() -> list[str]:
    """The columns a row is copied by (the generated full-text column is recomputed)."""
    rows = database.execute_sql(
        "SELECT column_name FROM information_schema.columns WHERE table_schema ="
        " current_schema() AND table_name = 'completions' AND is_generated = 'NEVER'"
        " ORDER BY ordinal_position"
    ).fetchall()
    return [f'"{column}"' for (column,) in rows]


def _lock_timeout() -> None:
    database.execute_sql(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")


def _lock_busy(exc: Exception) -> bool:
    """True for PostgreSQL's lock_not_available, wherever peewee kept the driver's error."""
    for error in (exc, *exc.args[:1], exc.__cause__, exc.__context__):
        if getattr(error, "sqlstate", None) == "55P03":
            return True
    return False
