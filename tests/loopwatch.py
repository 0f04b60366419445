"""Watching a worker's event loop: how long it went without a turn while a block ran;
a loop that the pool's wake-ups do not reach; a disk whose syncs take long; an ``flock``
that would wait on the loop for this process."""

from __future__ import annotations

import fcntl
import itertools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import gevent
import pytest
from gevent import monkey
from gevent.threadpool import ThreadResult

from gateway import offloop


@dataclass
class Watch:
    took: float = 0.0  # seconds the block ran
    ticks: list[float] = field(default_factory=list)

    @property
    def longest(self) -> float:
        """The longest time between two turns of the loop (a call waits that long)."""
        return max(b - a for a, b in itertools.pairwise(self.ticks))


@contextmanager
def watch_loop() -> Iterator[Watch]:
    """A greenlet takes a turn every 2 ms (a call in the worker) while the block runs."""
    watch = Watch()

    def tick() -> None:
        while True:
            watch.ticks.append(time.monotonic())
            gevent.sleep(0.002)

    ticker = gevent.spawn(tick)
    gevent.sleep(0.01)
    started = time.monotonic()
    try:
        yield watch
    finally:
        watch.took = time.monotonic() - started
        gevent.sleep(0.01)  # a turn after the block, or a frozen loop would show no gap
        ticker.kill()


def assert_kept_turning(watch: Watch) -> None:
    assert watch.took > 0.2, f"{watch.took:.3f} s: too short to show anything"
    # On a busy machine the loop's turns come late; stopped, it would miss them all.
    assert watch.longest < watch.took / 3, f"stopped {watch.longest:.3f} s of {watch.took:.3f}"


@contextmanager
def lost_wakeups() -> Iterator[list]:
    """The hub's thread pool finishes its tasks without waking the loop (as was once seen
    in a test process), and waits for it look every 0.05 s (``offloop``). Yields the
    tasks' results held back; afterwards each gets its wake-up, late: harmless, and it
    frees the pool's slot. A wait that never looks fails the block after 5 s."""
    held: list[ThreadResult] = []

    def set_without_waking(result: ThreadResult, value: object) -> None:
        result.value = value
        held.append(result)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(offloop, "LOST_WAKEUP_CHECK", 0.05)
        patch.setattr(ThreadResult, "set", set_without_waking)
        with gevent.Timeout(5, AssertionError("waited for a wake-up that never comes")):
            yield held
    for result in held:
        result.async_watcher.send()
    gevent.sleep(0.05)


SYNC_TAKES = 0.3  # seconds an fsync takes on a busy disk (tens to hundreds of ms)


def slow_disk(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each ``os.fsync`` holds its OS thread ``SYNC_TAKES`` seconds, as a busy disk's
    does (a real sleep: on the loop's thread it stops the loop). Returns the descriptors
    whose sync has ended, as they end."""
    sleep, real = monkey.get_original("time", "sleep"), os.fsync
    synced: list[int] = []

    def fsync(fd: int) -> None:
        sleep(SYNC_TAKES)
        real(fd)
        synced.append(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def no_wait_in_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail an ``flock`` that would wait: in one process, the lock is held by another
    greenlet, waiting beside the loop for a sync whose end the loop, stopped in the
    kernel's wait, could never hear (a deadlock, where the test would hang)."""
    real = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        try:
            real(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AssertionError("waited in flock, on the loop, for this process") from None

    monkeypatch.setattr(fcntl, "flock", flock)
