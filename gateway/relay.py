"""The calls of one worker: started here, stopped here at shutdown.

``Relay.open`` starts a call (``call.py``): its producer greenlet in the ``calls``
group (which shutdown waits for), its socket watcher in ``watchers`` (killed, never
waited for), and waits for the first byte or the whole answer, raising the call's
GatewayError if it has none. ``stop_all`` ends whatever still runs at shutdown;
each call records itself.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import gevent
import gevent.pool

from gateway.call import SHUTDOWN, Call, EmbeddingCall, Plan, Settings
from gateway.downstream import Pace
from gateway.exchange import EMBEDDING

log = logging.getLogger(__name__)


class Relay:
    """Starts calls and owns their greenlets; stops them all at shutdown."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.calls = gevent.pool.Group()  # producers and drain timers
        self.watchers = gevent.pool.Group()  # killed, never waited for
        self._active: set[Call] = set()
        self.drains = 0

    def spawn(self, fn: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        """Run ``fn`` in the call group, logging if it dies of an exception."""
        greenlet = self.calls.spawn(fn, *args)
        greenlet.link_exception(_log_death)
        return greenlet

    def open(self, plan: Plan, sock: socket.socket | None) -> Call:
        """Start a call; wait for its first byte (or whole answer); raise its error."""
        call = (EmbeddingCall if plan.exchange.kind == EMBEDDING else Call)(self, plan, sock)
        self._active.add(call)
        call.producer = self.spawn(self._run, call)
        call.down.start_watching(self.watchers)
        gevent.wait([call.ready, call.down.gone], count=1)
        if call.abandoned:
            call.down.stop_watching()
            return call
        try:
            call.ready.get()
        except BaseException:
            call.down.stop_watching()
            raise
        if not call.stream:
            call.down.stop_watching()
        return call

    def _run(self, call: Call) -> None:
        try:
            call.produce()
        finally:
            self._active.discard(call)

    def stop_all(self, reason: str = SHUTDOWN) -> int:
        """Stop every call in flight; each records itself. Return how many."""
        calls = list(self._active)
        for call in calls:
            call.stop(reason, "failed")
        return len(calls)

    def wait(self, timeout: float | None) -> bool:
        """Wait for every call to end; True if they all did."""
        return self.calls.join(timeout=timeout)

    @property
    def active(self) -> int:
        """Calls in flight in this worker."""
        return len(self._active)


relay = Relay()


def init_app(app: Any) -> None:
    """Take the relay's settings from the app's config."""
    cfg = app.config
    mode = str(cfg["ON_DISCONNECT"]).lower()
    if mode not in ("drain", "cancel"):
        raise ValueError(f"GATEWAY_ON_DISCONNECT must be drain or cancel, not {mode!r}")
    relay.settings = Settings(
        on_disconnect=mode,
        drain_timeout=float(cfg["DRAIN_TIMEOUT"]),
        max_drains=int(cfg["MAX_DRAINS"]),
        call_timeout=float(cfg["CALL_TIMEOUT"]),
        pace=Pace(
            heartbeat=float(cfg["HEARTBEAT_INTERVAL"]),
            probe_interval=float(cfg["PROBE_INTERVAL"]),
            write_timeout=float(cfg["CLIENT_WRITE_TIMEOUT"]),
        ),
        tries_per_provider=int(cfg["TRIES_PER_PROVIDER"]),
        backoff=(float(cfg["BACKOFF_MIN"]), float(cfg["BACKOFF_MAX"])),
        embedding_record_values=int(cfg["EMBEDDING_RECORD_VALUES"]),
    )


def _log_death(greenlet: gevent.Greenlet) -> None:
    log.error("relay: greenlet died", exc_info=greenlet.exc_info)
