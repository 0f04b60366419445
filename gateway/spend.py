"""Each budgeted key's spend this month, in the limits' store, raised to what the records say.

The store (Redis, or each worker's memory) totals a key's spend as its calls end
(``Limiter.finish``), but it forgets: a restarted Redis has none, a worker process
starts empty. The records keep every call's cost (``ledger``). An admission of a
budgeted key says when the store's total has not been raised to the records' figure
for ``seed_every`` seconds (10 minutes in Redis; in a worker's memory ``CACHE_TTL``, at
least 1): one admission of all the workers sharing the store is told, per key and
interval. Its worker reads the month's figure here, in the background within
``DB_TIMEOUT``, and raises the store's total to it (``Limiter.seed_spend``). The call is
not held: the database stays off the call path (SPEC rule 8), so a call admitted before
the figure lands is admitted on the store's view, and while the database is away the
store's view is all there is. A read the database did not answer is tried again every
``CACHE_TTL`` (at least 1 s, as often as the keys are re-read), one read at a time: the
figure lands within that of the database's return, not when the key's mark lapses.
Records written back from a journal (the recorder's, after an outage) have their keys'
spend raised to them again as they land.
"""

from __future__ import annotations

import logging
from datetime import datetime

import gevent
import gevent.pool
from flask import Flask

from gateway import db, ledger
from gateway.auth import keys
from gateway.limiter import SEED_EVERY_MIN, limiter
from gateway.recorder import recorder

log = logging.getLogger(__name__)


class Seeder:
    """Reads the month's spend of the keys the limiter asks about; one greenlet at a time."""

    def __init__(self) -> None:
        self.timeout = 10.0
        self.retry_after = SEED_EVERY_MIN
        self._due: dict[int, datetime] = {}  # key id -> when its admission asked
        self._group = gevent.pool.Group()
        self._failing = False

    def init_app(self, app: Flask) -> None:
        """Take DB_TIMEOUT and CACHE_TTL; answer the limiter's questions about unseeded spend."""
        self.timeout = float(app.config["DB_TIMEOUT"])
        self.retry_after = max(SEED_EVERY_MIN, float(app.config["CACHE_TTL"]))
        limiter.on_unseeded = self.ask
        recorder.on_written_late = self.written_late

    def ask(self, key_id: int, now: datetime) -> None:
        """Raise the key's spend in ``now``'s month to the records' figure, soon; not for
        a key known to have no budget. The store totals every key's spend, and a call
        that ended while Redis was away, or a record written back from a journal, asks
        for its key whatever it is: a read over the key's month of records each."""
        if keys.without_budget(key_id):
            return
        self._due[key_id] = now
        if len(self._group) == 0:
            greenlet = self._group.spawn(self._seed_while_due)
            greenlet.link_exception(lambda g: log.error("spend: seeder died", exc_info=g.exc_info))

    def written_late(self, rows: list[dict]) -> None:
        """Records written back from a journal: raise their keys' spend to them, now.

        A raise since the database came back may have read the records without them.
        With Redis restarted during the outage, the store counted the outage's calls and
        the records those before it: the greater stood, and the other was missing until
        the key's mark lapsed.
        """
        for row in rows:
            if row.get("cost_nanos"):
                self.ask(row["api_key"], row["created_at"])

    def wait(self, timeout: float) -> bool:
        """Wait for the seeding in the background to end; True if none is left running."""
        return self._group.join(timeout=timeout)

    def _seed_while_due(self) -> None:
        while self._due:
            key_id, now = self._due.popitem()
            try:
                with db.background(self.timeout):
                    nanos = ledger.month_spend(now, key_id).get(key_id, 0)
            except Exception as exc:
                if not self._failing:
                    log.warning("spend: cannot read a key's spend from the records (%s)", exc)
                self._failing = True
                # Kept and tried again soon, not when its mark lapses (10 minutes in
                # Redis): meanwhile its budget holds on the store's figure alone.
                self._due.setdefault(key_id, now)  # unless asked again meanwhile
                gevent.sleep(self.retry_after)
                continue
            self._failing = False
            limiter.seed_spend(key_id, nanos, now)


seeder = Seeder()
