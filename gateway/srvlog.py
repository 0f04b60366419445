"""The gateway's own warnings and errors, kept in ``srv_logs`` for operators to read.

A logging handler on the ``gateway`` logger takes every record at ``SRV_LOG_LEVEL``
and above (upstream failures, journal use, limiter fail-open, sweeps, snapshot use)
and only queues it, in memory: logging never waits on the database. A background
greenlet writes the queue every ``SRV_LOG_INTERVAL`` seconds in one INSERT.

- Never recursing: records logged by the writer itself (or by this module) are not
  queued, so a failure to write a log never becomes a log to write.
- Bounded: at most ``SRV_LOG_QUEUE`` records wait (while the database is away, say);
  later ones are dropped and counted, and the count is written as a record of its own
  when the database answers again.
- Floods: one message (same logger, same text before its arguments) is kept at most
  ``SRV_LOG_BURST`` times per ``SRV_LOG_WINDOW`` seconds; the rest are counted and
  written as one "repeated N more times" record when the window closes.

Rows carry NexusGate's columns (``level`` is ``error``, ``warn``, ``info`` or
``unspecific``) and ``details`` ``{type, logger, process, exception?, repeated?}``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import gevent
import gevent.pool
from flask import Flask, url_for
from gevent import monkey

from gateway import db
from gateway.models import SrvLog, utcnow
from gateway.sweeper import identity
from gateway.urlargs import Pages

log = logging.getLogger(__name__)

LEVELS = (("error", logging.ERROR), ("warn", logging.WARNING), ("info", logging.INFO))
MESSAGE_CHARS = 4000
TRACEBACK_CHARS = 8000
BATCH = 500
_FORMATTER = logging.Formatter()


class Handler(logging.Handler):
    """Queues the gateway's log records; a greenlet writes them to ``srv_logs``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.queue: deque[dict] = deque()
        self.limit = 1000
        self.burst = 5
        self.window = 10.0
        self.interval = 1.0
        self.timeout = 10.0
        self.dropped = 0  # queue full: not kept, to be reported
        self.written = 0
        self._floods: dict[tuple[str, str], list] = {}  # key -> [window start, seen, kept row]
        self._writer: gevent.Greenlet | None = None
        self._group = gevent.pool.Group()
        self._away = False
        self._busy = 0  # batches being written now (the writer, and a flush at shutdown)

    def configure(self, cfg: dict) -> None:
        """Read the SRV_LOG_* settings."""
        level = str(cfg["SRV_LOG_LEVEL"]).upper()
        self.setLevel(logging.CRITICAL + 1 if level in ("", "OFF") else level)
        self.limit = int(cfg["SRV_LOG_QUEUE"])
        self.burst = int(cfg["SRV_LOG_BURST"])
        self.window = float(cfg["SRV_LOG_WINDOW"])
        self.interval = float(cfg["SRV_LOG_INTERVAL"])
        self.timeout = float(cfg["DB_TIMEOUT"])

    def forget(self) -> None:
        """Drop what waits to be written: queued rows, the counts of open windows (each
        would queue its "repeated N more times" row when it closes) and of drops."""
        self.queue.clear()
        self._floods.clear()
        self.dropped = 0

    # -- the logging side: cheap, never blocks, never touches the database ---------

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == __name__ or (
            self._writer is not None and gevent.getcurrent() is self._writer
        ):
            return
        try:
            key = (record.name, str(record.msg))
            now = time.monotonic()
            flood = self._floods.get(key)
            if flood is None or now - flood[0] >= self.window:
                self._close_flood(key)
                flood = self._floods[key] = [now, 0, None]
            flood[1] += 1
            if flood[1] > self.burst:
                return  # counted: the window's summary says how many
            row = self._row(record)
            if self._keep(row) and flood[2] is None:
                flood[2] = row  # what the window's summary repeats
        except Exception:
            self.handleError(record)

    def _keep(self, row: dict) -> bool:
        if len(self.queue) >= self.limit:
            self.dropped += 1
            return False
        self.queue.append(row)
        return True

    def _row(self, record: logging.LogRecord) -> dict:
        details: dict[str, Any] = {
            "type": record.name.rpartition(".")[2],
            "logger": record.name,
            "process": identity(),
        }
        if record.exc_info:
            details["exception"] = _FORMATTER.formatException(record.exc_info)[-TRACEBACK_CHARS:]
        return {
            "message": record.getMessage()[:MESSAGE_CHARS],
            "level": next((name for name, no in LEVELS if record.levelno >= no), "unspecific"),
            "details": details,
            "created_at": datetime.fromtimestamp(record.created, UTC).replace(tzinfo=None),
        }

    def _close_flood(self, key: tuple[str, str]) -> None:
        """End a message's window: queue how many more times it came, if it did."""
        flood = self._floods.pop(key, None)
        if flood is None or flood[1] <= self.burst or flood[2] is None:
            return
        repeated = flood[1] - self.burst
        row = flood[2]
        self._keep(
            {
                **row,
                "message": f"{row['message']} (repeated {repeated} more times)"[:MESSAGE_CHARS],
                "details": {**row["details"], "repeated": repeated, "window": self.window},
                "created_at": datetime.now(UTC).replace(tzinfo=None),
            }
        )

    # -- the writer -----------------------------------------------------------------

    def start(self) -> None:
        """Start the writer in this process, once."""
        if self._writer is None:
            self._writer = self._group.spawn(self._loop)
            self._writer.link_exception(
                lambda g: log.error("srvlog: writer died", exc_info=g.exc_info)
            )

    def _loop(self) -> None:
        while True:
            gevent.sleep(self.interval)
            try:
                self.write()
            except Exception:  # never let the writer stop; say so on stderr only
                log.exception("srvlog: write failed")

    def write(self, timeout: float | None = None) -> int:
        """Write what waits (and the count of what was dropped); return rows written."""
        now = time.monotonic()
        for key in [k for k, f in self._floods.items() if now - f[0] >= self.window]:
            self._close_flood(key)
        if len(self._floods) > 10_000:  # distinct messages must not grow this for ever
            self._floods.clear()
        batch = [self.queue.popleft() for _ in range(min(len(self.queue), BATCH))]
        # Taken now, not once written: a write overlapping this one (the writer's turn
        # and a flush) must not report the same drops a second time.
        dropped, self.dropped = self.dropped, 0
        if dropped:
            batch.append(
                {
                    "message": f"{dropped} server log records were dropped: the queue was full",
                    "level": "warn",
                    "details": {"type": "srvlog", "logger": __name__, "dropped": dropped},
                    "created_at": datetime.now(UTC).replace(tzinfo=None),
                }
            )
        if not batch:
            return 0
        self._busy += 1
        try:
            with db.background(timeout or self.timeout):
                SrvLog.insert_many(batch).execute()
        except Exception as exc:
            # Keep them for the next try, oldest first; past the bound they are counted.
            kept = batch[:-1] if dropped else batch
            self.dropped += dropped
            self.queue.extendleft(reversed(kept))
            while len(self.queue) > self.limit:
                self.queue.pop()
                self.dropped += 1
            if not self._away:
                log.warning("srvlog: cannot write server logs (%s); keeping them", exc)
            self._away = True
            return 0
        finally:
            self._busy -= 1
        self._away = False
        self.written += len(batch)
        return len(batch)

    def written_within(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the queue to be written; True if it was."""
        deadline = time.monotonic() + timeout
        while self.queue or self._busy:
            if time.monotonic() > deadline:
                return False
            gevent.sleep(0.01)
        return True


handler = Handler()


def init_app(app: Flask) -> None:
    """Send the gateway's warnings and errors to ``srv_logs`` (in a gevent process)."""
    handler.configure(app.config)
    if not monkey.is_module_patched("socket"):
        return  # a CLI command: no background writer to empty the queue
    logger = logging.getLogger("gateway")
    if handler not in logger.handlers:
        logger.addHandler(handler)
    handler.start()


# -- reading: the admin API's and the dashboard's lists -------------------------------

LEVEL_NAMES = ("error", "warn", "info", "unspecific")
PAGE_SIZE = 50


@dataclass
class Page(Pages):
    """A page of server logs, newest first, and the filters that chose it."""

    level: str = ""
    state: str = "open"  # open: not acknowledged yet; all
    page: int = 1
    total: int = 0
    rows: list = field(default_factory=list)
    size: int = PAGE_SIZE

    exact = True
    cap = 0

    def url(self, endpoint: str, **changes: Any) -> str:
        """This page's URL with some parameters changed."""
        params = {"level": self.level, "state": self.state, "page": self.page, **changes}
        params = {k: v for k, v in params.items() if v not in (None, "", 1, "open")}
        return url_for(endpoint) + (f"?{urlencode(params)}" if params else "")


def select(
    level: str = "",
    acknowledged: bool | None = None,
    api_key: int | None = None,
    completion: int | None = None,
    upstream: int | None = None,
) -> Any:
    """Server logs matching every filter given, newest first."""
    query = SrvLog.select().order_by(SrvLog.id.desc())
    if level:
        query = query.where(SrvLog.level == level)
    if acknowledged is not None:
        query = query.where(SrvLog.acknowledged == acknowledged)
    for column, value in (
        (SrvLog.related_api_key_id, api_key),
        (SrvLog.related_completion_id, completion),
        (SrvLog.related_upstream_id, upstream),
    ):
        if value is not None:
            query = query.where(column == value)
    return query


def page(args: Mapping[str, str]) -> Page:
    """The dashboard's page of server logs, as ``args`` ask (unknown values ignored)."""
    found = Page(
        level=args.get("level", "") if args.get("level") in LEVEL_NAMES else "",
        state="all" if args.get("state") == "all" else "open",
    )
    query = select(found.level, None if found.state == "all" else False)
    found.total = query.count()
    found.turn_to(args.get("page"))
    found.rows = list(query.paginate(found.page, found.size))
    return found


def acknowledge(query: Any) -> int:
    """Mark the logs ``query`` selects as seen; return how many were not yet."""
    ids = SrvLog.select(SrvLog.id).where(
        SrvLog.id.in_(query.select(SrvLog.id).order_by()) & (SrvLog.acknowledged == False)  # noqa: E712
    )
    return SrvLog.update(acknowledged=True, ack_at=utcnow()).where(SrvLog.id.in_(ids)).execute()
