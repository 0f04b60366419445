"""On SQLite, when the recorder's writers index the text that is due: in lots.

A final call's text goes to the full-text index in lots: a write leaves it due
(``migrations/0014``), and a writer indexes what is due, any process's, once
``INDEX_AT`` rows are or the first has waited ``INDEX_AFTER`` seconds
(``writes.index_due``); a search indexes what is due before it looks. ``IndexDue``
counts what this process's writes left due, says when a writer should index it, and
indexes it on that writer's connection; the statements are ``writes.py``'s. It writes
no record: the records are the recorder's alone.
"""

from __future__ import annotations

import logging
import time

import gevent

from gateway import db
from gateway.db import UNREACHABLE, database, is_postgres
from gateway.exchange import COMPLETION
from gateway.writes import index_all_due

# Said on the recorder's behalf, from its writers: server logs keep its name (``type``).
log = logging.getLogger("gateway.recorder")

# Final calls written whose text makes a writer index what is due, and the seconds the
# first of them waits at most (a search never waits: it indexes first).
INDEX_AT, INDEX_AFTER = 500, 1.0


class IndexDue:
    """The text this process's writes left due to the index; one per recorder."""

    def __init__(self) -> None:
        self.count = 0  # final calls written since the index last took what was due
        self.since = 0.0  # when the first of them was written
        self.indexing = False

    def written(self, rows: list[dict]) -> None:
        """Count the final calls just written: their text is due to the index."""
        if is_postgres():
            return
        due = sum(1 for r in rows if r.get("kind") == COMPLETION and r["status"] != "pending")
        if due and not self.count:
            self.since = time.monotonic()
        self.count += due

    def at(self, journaling: bool) -> float | None:
        """When a writer should index what is due (None: nothing this process wrote is,
        or the recorder is ``journaling``: the database is away)."""
        if not self.count or self.indexing or journaling:
            return None
        return self.since + (0.0 if self.count >= INDEX_AT else INDEX_AFTER)

    def index(self, timeout: float) -> None:
        """Index what is due, any process's, within ``timeout`` (``DB_TIMEOUT``). A
        failure leaves it due: the next time, or a search, indexes it."""
        self.indexing = True
        self.count = 0  # calls written from now on wait for the next time
        try:
            with gevent.Timeout(timeout, db.DatabaseTimeout("indexing timed out")):
                if database.is_closed():
                    database.connect()
                index_all_due()
        except UNREACHABLE as exc:  # an outage, or another process's lock held past the bound
            db.discard_connection()
            log.warning("recorder: the text due to the full-text index stays due (%s)", exc)
        except Exception:
            db.discard_connection()
            log.warning("recorder: the text due to the full-text index stays due", exc_info=True)
        finally:
            self.indexing = False
