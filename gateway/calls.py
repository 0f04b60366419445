"""The calls of one worker: opened here, bounded here when their client leaves, stopped here.

``calls.open`` starts a call (``call.py``) in the view's own greenlet, up to its
whole JSON answer or a stream's first event, and returns once the call has something
to answer with. Once a stream's upstream is read (by the relay, or by a finisher itself
for a body the relay cannot watch), a finisher finishes it: a greenlet kept for the
next stream once done (``Finishers``); shutdown waits for every call in flight. A
call's socket watcher is
in a group that is killed, never waited for. When a client leaves, the
drain policy is applied here (SPEC rule 3): ``ON_DISCONNECT=cancel`` stops the call at
once; otherwise it drains, bounded by ``DRAIN_TIMEOUT`` and by a semaphore of
``MAX_DRAINS`` slots this module owns. ``stop_all`` ends whatever still runs at
shutdown; each call records itself. Nothing imports this module back: a call knows it
only through the callback it is given.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.hub
import gevent.lock
import gevent.pool

from gateway import metrics
from gateway.call import Call
from gateway.ending import ABORTED, End
from gateway.plan import Plan, Settings

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)


class Calls:
    """Opens calls and owns their greenlets; bounds drains; stops them all at shutdown."""

    def __init__(self) -> None:
        self.settings: Settings | None = None  # from init_app
        self._finishers = Finishers(self._finish)
        self._group = gevent.pool.Group()  # drain timers
        self._watchers = gevent.pool.Group()  # killed, never waited for
        self._active: set[Call] = set()
        self._idle = gevent.event.Event()  # no call in flight
        self._idle.set()
        # A draining call -> its timer and the semaphore it took its slot from.
        self._draining: dict[Call, tuple[gevent.Greenlet, gevent.lock.BoundedSemaphore]] = {}
        self._drains = gevent.lock.BoundedSemaphore(0)

    def init_app(self, app: Flask) -> None:
        """Take the calls' settings from the app's config."""
        self.settings = Settings.from_config(app.config)
        self._drains = gevent.lock.BoundedSemaphore(self.settings.max_drains)

    def open(self, plan: Plan, sock: socket.socket | None, interim: bool = False) -> Call:
        """Start a call; wait for its first byte (or whole answer); raise its error.

        ``interim``: its client speaks HTTP/1.1, and may be sent an interim response.
        """
        assert self.settings is not None, "calls.init_app was not called"
        call = Call(plan, self.settings, sock, self._client_left, self._finish_later, interim)
        self._active.add(call)
        # Until the first byte the view's own greenlet produces the call: its client
        # waits for that anyway, and no greenlet is spawned, switched to and back. A
        # JSON answer is read whole there; a stream is handed on after its first event.
        call.produce_here(self._watchers, lambda: self._run(call))
        return call

    def stop_all(self) -> int:
        """Stop every call in flight (shutdown); each records itself. Return how many."""
        calls = list(self._active)
        for call in calls:
            call.stop(End.shutdown())
        return len(calls)

    def wait(self, timeout: float | None) -> bool:
        """Wait for every call (and drain timer) to end; True if they all did."""
        started = time.monotonic()
        if not self._idle.wait(timeout):  # JSON answers produced in their views' greenlets
            return False
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return self._group.join(timeout=left)

    @property
    def active(self) -> int:
        """Calls in flight in this worker."""
        return len(self._active)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        greenlet = self._group.spawn(fn, *args)
        greenlet.link_exception(_log_death)
        return greenlet

    def _run(self, call: Call) -> None:
        self._idle.clear()
        metrics.call_opened()
        over = True  # unless produce says the relay has it
        try:
            over = call.produce()
        finally:
            if over:
                self._closed(call)

    def _finish_later(self, call: Call) -> None:
        """A stream the relay read is to be finished (and shutdown waits for that: the
        call is active until then). Callable from the hub: it never waits."""
        self._finishers.run(call)

    def _finish(self, call: Call) -> None:
        try:
            call.finish()
        finally:
            self._closed(call)

    def _closed(self, call: Call) -> None:
        """A call is over and recorded."""
        self._active.discard(call)
        if not self._active:
            self._idle.set()
        metrics.call_closed()
        drain = self._draining.pop(call, None)
        if drain is not None:
            timer, slots = drain
            timer.kill(block=False)
            slots.release()
            metrics.drain_ended()
        if call.exchange.status == ABORTED:
            metrics.aborted(_how_it_ended(call))

    def _client_left(self, call: Call, how: str) -> None:
        """A call's client left while its upstream is read: cancel, or drain within bounds."""
        settings = self.settings
        if settings.on_disconnect == "cancel":
            call.stop(End.cancel(how))
        elif not self._drains.acquire(blocking=False):
            call.stop(End.max_drains(how, settings.max_drains))
        else:
            self._draining[call] = (self._spawn(self._drain_deadline, call, how), self._drains)
            metrics.drain_started()

    def _drain_deadline(self, call: Call, how: str) -> None:
        gevent.sleep(self.settings.drain_timeout)
        call.stop(End.drain_timeout(how, self.settings.drain_timeout))


class Finishers:
    """Greenlets that finish streams, each kept for the next once done (up to ``KEEP``).

    A new greenlet's first Python frame takes a fresh 16 KB chunk of frame stack
    (Python 3.11: mapped, faulted in page by page, unmapped when the greenlet ends): a
    spawn and its end cost 15 µs in a loop, a switch to a kept greenlet 5, and among a
    worker's calls the kernel's share of the first is larger (a stream's one mmap,
    munmap and four page faults were about 28 µs of kernel time, perf, 2026-12-06).
    Finishes may wait (a client's copy, a FIN told apart, Redis), so one finish never
    waits behind another: with none kept free, another starts. What a finish raises is
    logged and the greenlet goes on. Nothing else holds a finisher, so none is killed
    while the worker serves; one that is anyway is handed no call.
    """

    KEEP = 8

    def __init__(self, finish: Callable[[Call], None]) -> None:
        self._finish = finish
        self._free: list[gevent.hub.Waiter] = []  # kept greenlets, waiting for a call

    def run(self, call: Call) -> None:
        """Finish ``call`` in a finisher, once this greenlet (or the hub's callback) is done."""
        if self._free:
            waiter = self._free.pop()
            waiter.hub.loop.run_callback(self._hand, waiter, call)
        else:
            gevent.spawn(self._serve, call)

    def _hand(self, waiter: gevent.hub.Waiter, call: Call) -> None:
        # In the hub. A finisher killed since it was picked would take the call with it
        # (a kill asked for before ``run`` lands first): another finishes it then.
        if waiter.greenlet is None:
            gevent.spawn(self._serve, call)
        else:
            waiter.switch(call)

    @property
    def free(self) -> int:
        """Finishers kept, waiting for a call."""
        return len(self._free)

    def _serve(self, call: Call) -> None:
        while True:
            try:
                self._finish(call)
            except Exception:
                log.exception("calls: finishing a call failed")
            if len(self._free) >= self.KEEP:
                return
            waiter = gevent.hub.Waiter()
            self._free.append(waiter)
            try:
                call = waiter.get()
            except BaseException:  # killed while kept: no call may be handed to it now
                if waiter in self._free:  # (not picked already: ``_hand`` sees to that)
                    self._free.remove(waiter)
                raise


calls = Calls()


def _how_it_ended(call: Call) -> str:
    """An aborted call's ending, for /metrics: ``drained`` when it was read to its end."""
    end = call.ending.end
    return "drained" if call.ending.answered or end is None else end.kind


def _log_death(greenlet: gevent.Greenlet) -> None:
    log.error("calls: greenlet died", exc_info=greenlet.exc_info)
