"""The relay: one greenlet of the worker's moves every stream's upstream bytes as they come.

A stream's producer used to wait for each upstream read in a greenlet of its own, for
the whole life of the stream; gevent keeps a waiting greenlet's C stack and its pages
of Python frames, about 9 KB an open stream (issue 11). Here a stream waits as a watch
in the hub (``upstream.Events.expect``); once its upstream's bytes come, its ``pump``
joins this queue, and the relay's greenlet runs it: the pump takes what has come
without waiting, translates it and puts it on the client's side (which never waits
either), then watches again. A pump that reads ``TURN`` times and still finds more
goes to the back of the queue, so one busy stream does not hold up the others.

The greenlet is the worker's, not a request's (SPEC rule 3); it lives as long as the
worker and is started again if anything ever ends it. A pump must never wait (it would
hold up every stream of the worker) and should not raise: what it raises is logged,
and ``Call``'s pump hands its call on to be finished whatever happens in it.
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

    def ready(self, pump: Callable[[], None]) -> None:
        """Run ``pump`` in the relay's greenlet, after those queued already.

        Callable from anywhere, the hub included (a watch's callback): it never waits.
        From the hub, a parked relay is switched to at once, as a watch wakes the
        greenlet that waits on it; from a greenlet, once that one waits.
        """
        self._queue.append(pump)
        parked = self._parked
        if self._greenlet is None or self._greenlet.dead:
            self._parked = None
            self._greenlet = gevent.spawn(self._serve)
        elif parked is not None:
            self._parked = None
            hub = gevent.get_hub()
            if gevent.getcurrent() is hub:
                parked.switch(None)
            else:
                hub.loop.run_callback(parked.switch, None)

    def _serve(self) -> None:
        queue = self._queue
        while True:
            while queue:
                pump = queue.popleft()
                try:
                    pump()
                except Exception:
                    log.exception("relay: a pump raised")
            waiter = self._parked = gevent.hub.Waiter()
            waiter.get()


relay = Relay()
