"""The last known keys and model catalog: kept fresh in the background, kept on disk.

The public API answers from memory (``auth.keys``, ``routing.catalog``), so it never
needs the database on its path (SPEC rule 8). Each worker loads both at start and
re-reads them every ``CACHE_TTL`` seconds in one greenlet, within ``DB_TIMEOUT``;
while the database is away it keeps the last state and tries again. A call about
a key or model the worker does not know yet asks for one fresh read (``fresh``),
shared by every call asking meanwhile and never waited for while the database is
known down.

After each read that changed something, the state is written to ``SNAPSHOT_FILE``
(instance/snapshot.json, mode 0600, replaced atomically), with when that read started;
written and synced beside the loop (``offloop``: a busy disk's sync held every call of
the worker), one write of this process at a time, each of the state as of its turn.
The newest read wins across processes: a write renames its file into place under an
``flock`` (``.snapshot.json.lock``) and only over one of an older read (a worker held
up mid-write, by a busy disk or a stop, took every other back to its older read);
over a later one, it takes out only the keys this worker knows were revoked since
(a revocation's write: the key must not be in the file a moment longer).
A worker that starts while the database is away (a recycled one, say) serves from that
file, and so does a whole gateway started then, if the file was written by a build
with the same migrations (``usable``, which ``flask prepare`` asks). A worker that
cannot read takes from the file what another worker read after it last did
(``recall``): a key or model made a moment before the database went away, which only
that worker was asked for, is served by every worker of the instance. It holds secrets:
every live gateway key's SHA-256 hash and limits, and every provider's base URL and
API key, the keys sealed by the vault as the database holds them. ``CACHE_TTL`` 0
turns all this off: each call reads through (tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime
from pathlib import Path

import gevent
import gevent.event
import gevent.lock
import gevent.pool
from flask import Flask
from gevent import monkey

from gateway import db, offloop, snapshot_file
from gateway.auth import keys
from gateway.config import INSTANCE
from gateway.models import utcnow
from gateway.routing import catalog
from gateway.vault import vault

log = logging.getLogger(__name__)

FULL_EVERY = 300.0  # seconds between reads of every key, whatever the incremental reads saw
MIN_GAP = 0.25  # seconds between two reads: a flood of unknown keys costs 4 reads a second


class Refresher:
    """Keeps ``keys`` and ``catalog`` fresh; writes and reads the snapshot file."""

    def __init__(self) -> None:
        self.path = INSTANCE / "snapshot.json"
        self.ttl = 0.0
        self.wait = 1.0
        self.timeout = 10.0
        self._fresh_as_of = float("-inf")  # when the last successful read started
        self._started_at = float("-inf")  # when the last read started
        self._full_at = float("-inf")
        self._full_due = True
        self._written: str | None = None  # digest of what this process last wrote
        # When the read this worker's state comes from started (wall clock, as the file
        # says it): from its last successful read, or the file it started from.
        self._read_at: datetime | None = None
        self._looked: tuple[int, int, int] | None = None  # the file ``recall`` last read
        self._kick = gevent.event.Event()
        self._done = gevent.event.Event()  # replaced after every read
        self._group = gevent.pool.Group()
        self._running = False
        # One write at a time (a read's, a revocation's): each waits for the disk beside
        # the loop, they share the file aside, and a later turn must write a later state.
        self._writing = gevent.lock.Semaphore()

    def init_app(self, app: Flask) -> None:
        """Load keys and catalog (from the file if the database is away); refresh them."""
        cfg = app.config
        self.ttl = float(cfg["CACHE_TTL"])
        self.wait = float(cfg["KEY_LOOKUP_WAIT"])
        self.timeout = float(cfg["DB_TIMEOUT"])
        self.path = Path(cfg["SNAPSHOT_FILE"] or Path(app.instance_path) / "snapshot.json")
        background = self.ttl > 0 and monkey.is_module_patched("socket")
        for cache in (keys, catalog):
            cache.ttl = self.ttl
            cache.background = background
            cache.confirm = self.fresh if background else cache.read_through
        keys.on_revoked = self._revoked if background else lambda: None
        keys.on_forgot_all = self._kick.set if background else lambda: None
        if not background:
            return  # CLI commands and read-through tests: each lookup reads inline
        self._written, self._full_due = None, True
        if not self.refresh():
            self.load_file()
        if not self._running:
            self._running = True
            greenlet = self._group.spawn(self._loop)
            greenlet.link_exception(
                lambda g: log.error("snapshot: refresher died", exc_info=g.exc_info)
            )
        self._kick.set()

    def fresh(self, asked: float) -> bool:
        """Make the caches reflect the database as of ``asked``; False if they cannot
        (they then hold what another worker read later, if one did: ``recall``)."""
        if self._read_since(asked):
            return True
        self.recall()
        return False

    def _read_since(self, asked: float) -> bool:
        deadline = asked + self.wait
        while self._fresh_as_of < asked:
            if not db.reachable():
                return False  # known down: answer from what we have, at once
            done = self._done
            self._kick.set()
            if not done.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def refresh(self) -> bool:
        """Read what changed (everything after an outage); True if the read succeeded."""
        started = self._started_at = time.monotonic()
        read_at = utcnow()
        full = self._full_due or started - self._full_at > FULL_EVERY
        try:
            with db.background(self.timeout):
                changed = keys.refresh(full=full)
                changed = catalog.refresh() or changed
        except Exception as exc:
            if not self._full_due:
                log.warning("snapshot: cannot read keys and catalog (%s); serving the last", exc)
            self._full_due = True  # what changed meanwhile is read in full
            self._finished()
            return False
        if full:
            self._full_at, self._full_due = started, False
        self._fresh_as_of, self._read_at = started, read_at
        self._finished()
        if changed or self._written is None:
            self._write()
        return True

    def _finished(self) -> None:
        done, self._done = self._done, gevent.event.Event()
        done.set()

    def _loop(self) -> None:
        while True:
            self._kick.wait(self.ttl if self.ttl > 0 else None)
            self._kick.clear()
            if self.ttl <= 0:
                continue  # a later init_app turned it off (tests)
            gevent.sleep(max(0.0, self._started_at + MIN_GAP - time.monotonic()))
            try:
                self.refresh()
            except Exception:
                log.exception("snapshot: refresh failed")

    def _revoked(self) -> None:
        """A key was revoked (announced): the file must not hold it a moment longer,
        database or not. A worker that starts while the database is away serves the file,
        and the revocation was announced before it was there to hear it."""
        self._written = None
        self._group.spawn(self._write)

    # -- the file -------------------------------------------------------------

    def _write(self) -> None:
        """Write what the caches hold to the file, unless this process wrote just that;
        after the write in progress, if there is one (the state is taken at its turn)."""
        with self._writing:
            self._write_now()

    def _write_now(self) -> None:
        state = {"keys": keys.dump(), "catalog": catalog.dump()}
        text = json.dumps(state, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._written:
            return
        state["catalog"] = [_sealed(row) for row in state["catalog"]]  # sealing is random
        # The schema it was read from: a start without the database serves it only if
        # this build's migrations are the same (``usable``).
        written = {
            "written_at": utcnow().isoformat(),
            "read_at": self._read_at and self._read_at.isoformat(),
            "schema": db.known_migrations(),
        }
        body = json.dumps({**written, **state})
        try:
            args = (self.path, body, self._read_at, keys.revoked())
            offloop.run_to_end(snapshot_file.replace, args, "a snapshot write")
        except OSError:
            log.exception("snapshot: cannot write %s", self.path)
            # Written again at the next read, changed or not: else the file would stay
            # stale (a key revoked since, still in it) until something else changed.
            self._written = None
            return
        self._written = digest

    def usable(self) -> tuple[bool, str]:
        """Whether the file can serve a start without the database, and what it is (its
        time) or why not: a start while the database is away (``flask prepare``). It is
        loaded as a worker would load it (into this process's caches)."""
        try:
            data = self._load()
            schema, written_at = data["schema"], data["written_at"]
        except FileNotFoundError:
            return False, f"there is no {self.path} (workers write it once they read the keys)"
        except _UNREADABLE as exc:
            return False, f"{self.path} is unreadable ({type(exc).__name__}: {exc})"
        if tuple(schema) != db.known_migrations():
            return False, f"{self.path} was written by a build with other migrations"
        return True, f"{self.path}, written {written_at}"

    def load_file(self) -> bool:
        """Serve the keys and catalog of the snapshot file; False if there is none."""
        try:
            data = self._load()
        except FileNotFoundError:
            log.error("snapshot: database unreachable and no %s: no keys known yet", self.path)
            return False
        except _UNREADABLE:
            log.exception("snapshot: database unreachable and %s unreadable", self.path)
            return False
        log.warning(
            "snapshot: database unreachable: serving %d keys and %d models from %s (written %s)",
            len(data["keys"]),
            len(data["catalog"]),
            self.path,
            data.get("written_at"),
        )
        return True

    def recall(self) -> None:
        """The database cannot be read: serve what the file holds of a read another
        worker made after this one's last (``KeyCache.recall``: the keys this worker does
        not know; the catalog, whole). Each version of the file is read once."""
        try:
            stat = self.path.stat()
        except OSError:
            return
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if version == self._looked:
            return
        self._looked = version
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            read_at = _read_at(data)
            rows = [_opened(row) for row in data["catalog"]]
        except _UNREADABLE:
            log.exception("snapshot: database unreachable and %s unreadable", self.path)
            return
        if not read_at or (self._read_at is not None and read_at <= self._read_at):
            return  # this worker's own read, an older one, or one of unknown age
        recalled = keys.recall(data["keys"])
        catalog.load(rows)
        log.warning(
            "snapshot: database unreachable: serving %d keys and %d models another "
            "worker read at %s (from %s)",
            recalled,
            len(rows),
            data["read_at"],
            self.path,
        )

    def _load(self) -> dict:
        """The file's keys and catalog into the caches; what it holds."""
        data = json.loads(self.path.read_text(encoding="utf-8"))
        keys.load(data["keys"])
        catalog.load([_opened(row) for row in data["catalog"]])
        self._read_at = _read_at(data)
        return data


_UNREADABLE = (OSError, ValueError, KeyError, TypeError)


def _read_at(data: dict) -> datetime | None:
    """When the read a file holds started; None if it does not say (an earlier build
    wrote it, or a worker started from such a file)."""
    stamp = data.get("read_at")
    return datetime.fromisoformat(stamp) if stamp else None


def _sealed(row: dict) -> dict:
    return {**row, "api_key": row["api_key"] and vault.seal(row["api_key"])}


def _opened(row: dict) -> dict:
    return {**row, "api_key": row["api_key"] and vault.open(row["api_key"])}


refresher = Refresher()
