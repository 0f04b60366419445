"""Watching a worker's event loop: how long it went without a turn while a block ran."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import gevent


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
