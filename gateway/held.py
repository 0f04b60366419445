"""What the recorder holds in memory while neither the database nor the journal takes it.

The database is down and the disk is full (or failing): the recorder queues a batch's
calls again and tries them every ``HOLD_RETRY`` seconds. ``Held`` keeps the account:
each held call's record size as JSON, up to ``HOLD_BYTES`` in all (beyond, a batch is
lost, logged and counted, not the worker: a record's objects take a few times its
JSON in memory), when holding began (said once), and how long it lasted once none is
held. The calls themselves stay in the recorder's queue; nothing here writes a record.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

from gateway import metrics

# Said on the recorder's behalf, from its writers: server logs keep its name (``type``).
log = logging.getLogger("gateway.recorder")

HOLD_RETRY, HOLD_BYTES = 1.0, 128 * 1024 * 1024


class Held:
    """The records held in memory, by call; one per recorder."""

    def __init__(self) -> None:
        self.since: float | None = None  # when records were first kept in memory
        self.sizes: dict[str, int] = {}  # uid -> its record's JSON, while held

    def __contains__(self, uid: object) -> bool:
        return uid in self.sizes

    def hold(self, rows: list[dict]) -> bool:
        """Count a batch's rows as held, while the journal's failure is being handled;
        False, the rows lost, if they would pass ``HOLD_BYTES``."""
        sizes = {row["uid"]: len(json.dumps(row, default=str)) for row in rows}
        self.sizes.update(sizes)
        if sum(self.sizes.values()) > HOLD_BYTES:
            for uid in sizes:
                del self.sizes[uid]
            lost(rows, f"the journal failed and {HOLD_BYTES} bytes of records are held")
            return False
        if self.since is None:
            self.since = time.monotonic()
            log.exception(
                "recorder: neither the database nor the journal takes records; holding "
                "them in memory and trying again every %.0f s",
                HOLD_RETRY,
            )
        metrics.records_held(len(self.sizes))
        return True

    def released(self, uids: Iterable[str]) -> None:
        """These calls went to the database or the journal (or were let go): those that
        were held are no longer. Once none is, say how long calls were held.

        Per call, not per batch: a row the database refuses, held while the disk is full,
        stays held while other batches (another writer's) are written.
        """
        if self.since is None:
            return
        for uid in uids:
            self.sizes.pop(uid, None)
        metrics.records_held(len(self.sizes))
        if not self.sizes:
            log.warning(
                "recorder: records are taken again after %.0f s held in memory",
                time.monotonic() - self.since,
            )
            self.since = None


def lost(rows: list[dict], why: str) -> None:
    """Log and count records that nothing could keep (within an ``except``: its error)."""
    log.exception("recorder: LOST %d records (%s): %s", len(rows), why, [r["uid"] for r in rows])
    metrics.records_lost(len(rows))
