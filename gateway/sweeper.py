"""Rows left pending by a dead process are finalised by a living one (SPEC rule 7).

Every process has an identity (random id, host, pid), stamped on each row it records
(``owner``), and a heartbeat row it rewrites every ``PROCESS_HEARTBEAT`` seconds. A
process finalises an owner's pending rows (``failed``, ``swept``) once it has itself
watched that owner's heartbeat stand still, or stay absent, for ``PROCESS_DEAD_AFTER``
seconds of its own clock, and deletes the dead heartbeat row. No clock of another host
enters into it; and a process watches only while its own heartbeats succeed: when one
fails (the database is away, so nobody could beat), it forgets what it saw and starts
watching afresh, so an outage never makes a live process look dead. A live owner's
row is never swept, however long its call runs. An owner of this host whose process
still runs is not swept either, however long its heartbeat is silent: only its own link
to the database broke (``runs_here``). If one of another host is, its final write still
wins over the swept row. Rows without an owner
(written before heartbeats existed) keep the age rule: pending for ``SWEEP_AFTER``.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import gevent
import gevent.pool
from flask import Flask
from gevent import monkey

from gateway import db, metrics
from gateway.config import DEFAULTS
from gateway.db import UNREACHABLE
from gateway.journal import process_started
from gateway.models import ApiKey, Heartbeat, utcnow
from gateway.telemetry import telemetry
from gateway.writes import finalise_orphan_rows, pending_owners

log = logging.getLogger(__name__)

# Seconds a process may have begun after its first heartbeat's time and still own it
# (it begins before it beats; a start is known to a clock tick).
PID_SLACK = 1.0
SWEPT_ERROR = "orphaned: the gateway process handling this call stopped before it finished"
_identity: tuple[int, str] | None = None


def identity() -> str:
    """This process's name in ``owner`` columns: ``<random>@<place>:<pid>``."""
    global _identity
    if _identity is None or _identity[0] != os.getpid():  # a fork is a new process
        name = f"{secrets.token_hex(4)}@{_place()}:{os.getpid()}"
        _identity = (os.getpid(), name)
    return _identity[1]


def _place() -> str:
    """Where this process's pid means this process: its host's name and, where /proc
    says, its PID namespace (``vm~4026531836``). Containers that share a host's name
    (host networking) number their processes apart: a pid of another's is not ours."""
    host = socket.gethostname()[:64]
    try:
        space = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return host
    number = space.rpartition("[")[2].rstrip("]")
    return f"{host}~{number}" if number.isdigit() else host


class Sweeper:
    """This process's heartbeat, and its watch over everyone else's."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, name: str | None = None
    ) -> None:
        self.clock = clock
        self._name = name  # tests play several processes in one
        self.heartbeat = self.dead_after = self.interval = self.timeout = 0.0
        self.orphan_after = timedelta(0)
        self._seen: dict[str, tuple[datetime | None, float]] = {}  # owner -> (beat, since)
        self._beat_ok: float | None = None  # when our last heartbeat landed; None: failing
        self._looked: float | None = None  # when we last looked at everyone's
        self._spared: set[str] = set()  # silent owners seen running here (said once)
        self._group = gevent.pool.Group()
        self._started = False
        self._configure(DEFAULTS)  # until init_app reads the app's settings

    def init_app(self, app: Flask) -> None:
        """Read the timings; start beating and sweeping in this process."""
        self._configure(app.config)
        if self._started or not monkey.is_module_patched("socket"):
            return  # a CLI command: no process to keep alive
        self._started = True
        self._spawn(self._loop, self.beat, lambda: self.heartbeat)
        self._spawn(self._loop, self.sweep, lambda: self.interval)

    def _configure(self, cfg: Any) -> None:
        self.heartbeat = float(cfg["PROCESS_HEARTBEAT"])
        self.dead_after = float(cfg["PROCESS_DEAD_AFTER"])
        self.interval = float(cfg["SWEEP_INTERVAL"])
        self.timeout = float(cfg["DB_TIMEOUT"])
        after = cfg["SWEEP_AFTER"]
        self.orphan_after = timedelta(
            seconds=float(after if after is not None else cfg["CALL_TIMEOUT"] + 120)
        )

    def _spawn(self, *args: object) -> None:
        greenlet = self._group.spawn(*args)
        greenlet.link_exception(lambda g: log.error("sweeper greenlet died", exc_info=g.exc_info))

    @property
    def name(self) -> str:
        return self._name or identity()

    def _loop(self, job: Callable[[], object], every: Callable[[], float]) -> None:
        while True:
            if every() > 0:  # a later init_app (tests) may turn it off or on
                try:
                    job()
                except UNREACHABLE:
                    pass  # the heartbeat says so, once
                except Exception:  # never let the heartbeat stop: others would sweep us
                    log.exception("sweeper: %s failed", getattr(job, "__name__", job))
            gevent.sleep(every() if every() > 0 else 1.0)

    def beat(self) -> bool:
        """Write this process's heartbeat; True if it landed."""
        try:
            with db.background(self.timeout):
                Heartbeat.beat(self.name, socket.gethostname()[:255], os.getpid())
        except UNREACHABLE as exc:
            if self._beat_ok is not None:
                log.warning("sweeper: heartbeat failed (%s); not sweeping until it lands", exc)
            self._beat_ok = None
            self._seen.clear()  # nobody could beat meanwhile: what we saw proves nothing
            return False
        self._beat_ok = self.clock()
        return True

    def sweep(self) -> int:
        """Finalise the pending rows of processes seen dead; return how many."""
        now = self.clock()
        gap, self._looked = now - (self._looked or now), now
        healthy = self._beat_ok is not None and now - self._beat_ok <= 2 * self.heartbeat + 1
        if not healthy or gap > 2 * self.interval + 1:
            self._seen.clear()  # we were not watching all along
            if not healthy:
                return 0
        try:
            with db.background(self.timeout):
                return self._sweep(now)
        except UNREACHABLE:
            self._seen.clear()
            raise

    def _sweep(self, now: float) -> int:
        rows = Heartbeat.select(Heartbeat.owner, Heartbeat.beat_at, Heartbeat.started_at)
        beats, began = {}, {}
        for owner, beat_at, started_at in rows.tuples():
            beats[owner], began[owner] = beat_at, started_at
        watched = (beats.keys() | pending_owners()) - {self.name}
        for owner in watched:
            held = self._seen.get(owner)
            if held is None or held[0] != beats.get(owner):
                self._seen[owner] = (beats.get(owner), now)
        for owner in self._seen.keys() - watched:
            del self._seen[owner]
        silent = [o for o, (_, since) in self._seen.items() if now - since >= self.dead_after]
        dead = [owner for owner in silent if not runs_here(owner, began.get(owner))]
        for owner in set(silent) - set(dead):
            if owner not in self._spared:
                self._spared.add(owner)
                log.warning(
                    "sweeper: %s has not beaten for %.0f s but still runs on this host:"
                    " its rows are left to it (its own link to the database is down)",
                    owner,
                    self.dead_after,
                )
        before = utcnow() - self.orphan_after
        swept = finalise_orphan_rows(dead, before, SWEPT_ERROR)
        count = len(swept)
        telemetry.export(swept)  # committed: these calls' spans, as their rows now say
        if swept:  # in /metrics too: no process of theirs will count them
            keys = {row["api_key"] for row in swept}
            comments = ApiKey.select(ApiKey.id, ApiKey.comment).where(ApiKey.id.in_(keys))
            metrics.calls_swept(swept, dict(comments.tuples()))
        if dead:
            Heartbeat.delete().where(Heartbeat.owner.in_(dead)).execute()
            for owner in dead:
                del self._seen[owner]
        if count:
            log.warning("sweeper: finalised %d pending records of dead processes %s", count, dead)
        return count


def runs_here(owner: str, started_at: datetime | None) -> bool:
    """Whether ``owner`` (``<random>@<place>:<pid>``) is a process of this place (host
    and PID namespace) that still runs: its pid is there and began no later than its
    first heartbeat (else a later process took the pid; with no heartbeat row, nothing
    tells). A silent heartbeat is then a broken link to the database (its connections
    refused or cut while this process kept its own), not a death: its calls are still
    running, and sweeping them recorded answered calls as ``failed``. Elsewhere (another
    host, another container on this one, an owner named before places were, or no
    /proc) nothing can be told: the heartbeat decides."""
    _, _, place = owner.partition("@")
    where, _, pid = place.rpartition(":")
    if where != _place() or not pid.isdigit() or started_at is None:
        return False  # no heartbeat row: nothing tells a later process from it
    began = process_started(int(pid))  # None: no such process (or no /proc)
    return began is not None and began <= started_at.replace(tzinfo=UTC).timestamp() + PID_SLACK


sweeper = Sweeper()
