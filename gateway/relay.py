"""The relay: every stream's upstream bytes moved as they come, without a greenlet each.

A stream's producer used to wait for each upstream read in a greenlet of its own, for
the whole life of the stream; gevent keeps a waiting greenlet's C stack and its pages
of Python frames, about 9 KB an open stream (issue 11). Here a stream waits as a watch
in the hub (``upstream.Events.expect``); once its upstream's bytes come, its ``pump``
runs: it takes what has come without waiting, translates it and puts it on the
client's side (which never waits either), then watches again. A pump that reads
``TURN`` times and still finds more goes to the back of the queue, so one busy stream
does not hold up the others.

Where a pump runs: readied by the hub (a watch's callback) with nothing queued before
it, in that callback itself, as gevent's own waits are woken (no switch to a greenlet
and back, two a chunk: about 2% of a stream's CPU in a loaded worker); otherwise in the
relay's greenlet, after those queued. The greenlet is the worker's, not a request's
(SPEC rule 3); it lives as long as the worker and is started again if anything ever
ends it. A pump must never wait: in the relay's greenlet a wait would hold up every
stream of the worker, in the hub it raises gevent's ``BlockingSwitchOutError`` (which
``Call``'s pump takes as the gateway's error, and records). A pump should not raise:
what it raises is logged, and ``Call``'s pump hands its call on to be finished
whatever happens in it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import gevent
import gevent.hub

log = logging.getLogger(__name__)

# Reads a pump makes before the next stream's turn.
TURN = 16


class Relay:
    """The queue of pumps whose streams have something to move, and the greenlet that runs them."""

    def __init__(self) -> None:
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        self._greenlet: gevent.Greenlet | None = None
        self._parked: gevent.hub.Waiter | None = None  # the greenlet waits for a pump
        self._in_hub = False  # a pump runs in the hub's callback now

    def ready(self, pump: Callable[[], None]) -> None:
        """Run ``pump`` after those queued already: here, or in the relay's greenlet.

        Callable from anywhere, the hub included (a watch's callback): it never waits.
        From the hub with the relay's greenlet waiting for pumps (none queued), the pump
        runs here and now; a pump readied while one runs there is queued, never run
        inside it. From a greenlet, the relay's greenlet runs it once that one waits.
        """
        parked = self._parked
        if parked is not None and not self._in_hub and gevent.getcurrent() is parked.hub:
            self._in_hub = True
            try:
                _run(pump)
            finally:
                self._in_hub = False
            return
        self._queue.append(pump)
        if self._greenlet is None or self._greenlet.dead:
            self._parked = None
            self._greenlet = gevent.spawn(self._serve)
        elif parked is not None:  # once this greenlet, or the hub's pump, is done
            self._parked = None
            parked.hub.loop.run_callback(parked.switch, None)

    def _serve(self) -> None:
        queue = self._queue
        while True:
            while queue:
                _run(queue.popleft())
            waiter = self._parked = gevent.hub.Waiter()
            waiter.get()


def _run(pump: Callable[[], None]) -> None:
    """Run a pump; what it raises is logged, and the relay goes on."""
    try:
        pump()
    except Exception:
        log.exception("relay: a pump raised")


relay = Relay()
