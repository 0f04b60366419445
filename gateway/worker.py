"""gunicorn's gevent worker, taught to finish calls and records before it exits.

gunicorn waits only for its own handler greenlets; a stream that is draining an
upstream after its client left has no handler, and the recorder writes in the
background. This worker, once told to stop (SIGTERM, SIGHUP reload, ``max_requests``)
keeps heart-beating while calls finish, and at ``graceful_timeout`` minus a margin
stops whatever is still running (recorded ``failed``, "gateway shutdown") and
flushes the recorder, journaling what the database has not taken by then, all before
the arbiter's SIGKILL: even while gunicorn still waits for a handler (one writing to a
client that reads nothing waits up to CLIENT_WRITE_TIMEOUT). Told to quit at once
(SIGQUIT, SIGINT), or orphaned by a dead master, it stops every call at once and writes
what it can in a few seconds: whatever way it ends, nothing it handled is left pending.

It also closes idle keep-alive connections as soon as it is told to stop: stock
gunicorn waits for them as if they were requests, so one idle SDK client would hold
every shutdown for the whole graceful_timeout. Its requests and responses go through
``gunicornhttp``'s cheaper stand-ins for gunicorn's own.

Imported by gunicorn's master, before gevent patches anything: so nothing from the
gateway is imported at module level here, but ``gunicornhttp`` (with ``sockets``, which
imports nothing) and ``resolver`` (with ``offloop``), which import only gevent and
gunicorn.
"""

from __future__ import annotations

import atexit
import gc
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool
from gunicorn.workers.ggevent import GeventWorker

from gateway import gunicornhttp, resolver

# Seconds kept back at the end of graceful_timeout to record stopped calls (a third
# of it at most), and of those, the last ones kept back to journal what the database
# has not taken by then (half of them at most): 16 MB of records took 0.26 s to
# journal on a 2-core VM running twice as many busy processes as cores.
FINALISE_MARGIN = 3.0
JOURNAL_MARGIN = 1.0
# Once stopping, a kept-alive connection's next request is still taken this long (and
# answered with Connection: close). Closed at once, a client that had just sent its
# next call on it lost it, unanswered (a POST is not retried): with max_requests
# recycling, about one call in 200 at 8 busy clients.
IDLE_GRACE = 1.0


def _refuse_a_loop_without_shared_watches() -> None:
    """Stop a worker whose gevent loop is libuv's (``GEVENT_LOOP``), before it serves.

    A call watches its client's socket for a hang-up while the connection's greenlet may
    read it, and a stream's upstream socket is watched by the hub between reads; libev
    lets two watchers share a socket, libuv refuses the second (``ConcurrentObjectUseError``),
    and every call would end in a 500.
    """
    loop = gevent.config.loop
    if not loop.__module__.startswith("gevent.libev."):
        raise RuntimeError(
            f"GEVENT_LOOP chose {loop.__module__}.{loop.__name__}: the gateway needs"
            " gevent's libev loop (libev-cext, the default, or libev-cffi), which lets"
            " two watchers share a socket; unset GEVENT_LOOP"
        )


def _thaw() -> None:
    """Give what ``load_wsgi`` froze back to the collector, and collect it."""
    gc.unfreeze()
    gc.collect()


def deadlines(stopped_at: float, graceful_timeout: float) -> tuple[float, float]:
    """When a worker told to stop at ``stopped_at`` stops its calls still running, and
    when it stops waiting for the database and journals the records left: both before
    the arbiter's SIGKILL at ``stopped_at + graceful_timeout``."""
    margin = min(FINALISE_MARGIN, graceful_timeout / 3)
    killed_at = stopped_at + graceful_timeout
    return killed_at - margin, killed_at - min(JOURNAL_MARGIN, margin / 2)


class GatewayWorker(GeventWorker):
    """A gevent worker that drains calls and the recorder within graceful_timeout."""

    _stop_at: float | None = None
    _alive = True
    _finishing = False  # the main greenlet, past gunicorn's handlers, finishes the records
    _told: Any = None  # while ``run`` runs: the hub's async watcher that wakes the guard

    @property
    def alive(self) -> bool:
        """gunicorn's flag: False once the worker is to stop."""
        return self._alive

    @alive.setter
    def alive(self, value: bool) -> None:
        # gunicorn lowers it from a signal's handler, a request (max_requests) or a
        # thread (the reloader): an async watcher's send is safe from all three. The
        # guard used to look at the flag every 0.1 s, and those ten wake-ups a second
        # were half of an idle worker's CPU (issue 11).
        self._alive = value
        if not value and self._told is not None:
            self._told.send()

    def init_process(self) -> None:
        _refuse_a_loop_without_shared_watches()
        self._idle: dict[gevent.Greenlet, gevent.Timeout] = {}
        self._served: weakref.WeakSet[gevent.Greenlet] = weakref.WeakSet()
        gunicornhttp.install()  # after the fork: only workers of this class
        # gevent records every greenlet's spawning stack and parent, for debugging
        # dumps nobody takes here: a walk of the stack and about 20 objects held per
        # greenlet: each connection has one (its handler), a stream a second (its finisher).
        gevent.config.track_greenlet_tree = False
        resolver.install()  # before the worker's hub first resolves a name
        self.cfg = gunicornhttp.SettledConfig(self.cfg)
        super().init_process()

    def load_wsgi(self) -> None:
        """Load the app, then take what is alive now out of the garbage collector's walks.

        The app and what it imported (about 95,000 objects) live as long as the worker,
        yet every full collection walked them all: 34 ms with every call of the worker
        waiting, every few thousand calls. Frozen (``gc.freeze``) they are not walked
        again. A collection first, so that no garbage is frozen with them.

        What was frozen and died since (a logging handler replaced at startup) is
        collected at exit, before the interpreter takes its modules apart: left to
        then, its finalizers (logging's weakref callbacks) ran without gevent and
        printed tracebacks at every worker's exit.
        """
        super().load_wsgi()
        config = getattr(self.wsgi, "config", None)  # not gunicorn's app for a failed load
        if config is not None:
            gunicornhttp.write_timeout = float(config["CLIENT_WRITE_TIMEOUT"])
            # From here on no log line waits for a slow reader of stdout or stderr.
            from gateway import logstreams, metrics

            logstreams.install(
                int(config["LOG_BACKLOG"]), metrics.log_lines_dropped, gevent.get_hub().loop
            )
        gc.collect()
        gc.freeze()
        atexit.register(_thaw)

    def handle_request(self, listener_name, req, sock, addr):  # type: ignore[no-untyped-def]
        self._served.add(gevent.getcurrent())  # this connection is now a kept-alive one
        try:
            return super().handle_request(listener_name, req, sock, addr)
        except TimeoutError:
            # Only writes to the client have a timeout (CLIENT_WRITE_TIMEOUT): it read
            # nothing for that long. A call still running counts it as gone and goes on;
            # the connection is closed, with a line, not gunicorn's error traceback.
            self.log.warning("gateway: closed a connection whose client stopped reading")
            raise StopIteration from None  # gunicorn closes the connection quietly

    @contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        """gunicorn's wait for a connection's next request.

        A connection that already served a request is idle: once stopping, it waits
        ``IDLE_GRACE`` at most. A fresh one (gevent may still accept for a moment after
        the worker stops) is waited for as usual, so its first request is served.
        """
        me = gevent.getcurrent()
        kept_alive = me in self._served
        wait = (
            min(IDLE_GRACE, self.cfg.keepalive)
            if kept_alive and not self.alive
            else self.cfg.keepalive
        )
        timeout = gevent.Timeout(wait, False)
        if kept_alive:
            self._idle[me] = timeout
        try:
            with timeout:  # expiry ends the wait quietly: gunicorn closes the connection
                yield
        finally:
            self._idle.pop(me, None)

    def _close_idle_connections(self) -> None:
        """Close each idle connection ``IDLE_GRACE`` from now, unless it is serving a
        request by then (whose answer closes it)."""
        for greenlet, timeout in list(self._idle.items()):
            gevent.spawn_later(IDLE_GRACE, self._close_if_idle, greenlet, timeout)

    def _close_if_idle(self, greenlet: gevent.Greenlet, timeout: gevent.Timeout) -> None:
        if self._idle.get(greenlet) is timeout:  # still in the same wait
            greenlet.kill(timeout, block=False)  # as if keep-alive had run out

    def handle_exit(self, sig, frame):  # type: ignore[no-untyped-def]
        # SIGTERM: the arbiter's SIGKILL clock starts now.
        self._stop_at = time.monotonic()
        super().handle_exit(sig, frame)

    def run(self) -> None:
        stopping = gevent.event.Event()
        told = gevent.get_hub().loop.async_()
        told.start(stopping.set)
        self._told = told
        if not self.alive:  # lowered before the watcher was there to hear it
            stopping.set()
        self._records_finished = gevent.lock.Semaphore()  # by one greenlet at a time
        guards = gevent.pool.Group()
        guard = guards.spawn(self._stop_calls_in_time, stopping)
        guard.link_exception(
            lambda g: self.log.error("gateway: shutdown guard died", exc_info=g.exc_info)
        )
        try:
            super().run()  # returns once gunicorn's own handlers are done
            self._finish_background()
        except BaseException:
            # A quick exit or an orphaned worker leaves run() by SystemExit: no time to
            # wait for calls, yet none may be left pending.
            self._finish_now()
            raise
        finally:
            guards.kill(block=False)
            self._told = None
            told.close()

    def _deadlines(self) -> tuple[float, float]:
        start = self._stop_at if self._stop_at is not None else time.monotonic()
        return deadlines(start, self.cfg.graceful_timeout)

    def _stop_calls_in_time(self, stopping: gevent.event.Event) -> None:
        """Once stopping, give calls (and repeats' replayed streams) until the deadline,
        then stop the rest, and finish the records if gunicorn's handlers are not done."""
        from gateway import replay
        from gateway.calls import calls

        stopping.wait()
        self._close_idle_connections()
        deadline, hard_deadline = self._deadlines()
        if not calls.wait(timeout=max(0.0, deadline - time.monotonic())):
            stopped = calls.stop_all()
            self.log.warning("gateway: stopped %d calls still running at graceful_timeout", stopped)
        if not replay.wait(timeout=max(0.0, deadline - time.monotonic())):
            cut = replay.stop_all()
            self.log.warning("gateway: %d repeats' answers still being written, recorded", cut)
        # gunicorn's run() returns once its handlers have, and a handler writing to a
        # client that reads nothing outlasts the arbiter's kill: the records would be
        # left to the write-ahead file, for the next start to find.
        gevent.sleep(max(0.0, deadline - time.monotonic()))
        if not self._finishing:
            self._finish_records(hard_deadline)

    def _finish_background(self) -> None:
        """After the handlers: wait for drains, then finish the records, heart-beating."""
        from gateway.calls import calls

        self._finishing = True
        deadline, hard_deadline = self._deadlines()
        while calls.active and time.monotonic() < deadline:
            self.notify()  # keep the arbiter's timeout watchdog quiet
            calls.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        self._finish_records(hard_deadline)

    def _finish_records(self, hard_deadline: float) -> None:
        """Stop the calls left, write the records until ``hard_deadline``, journal the rest."""
        from gateway import db, srvlog
        from gateway.calls import calls
        from gateway.limiter import limiter
        from gateway.recorder import recorder
        from gateway.telemetry import telemetry

        # The guard may have begun before gunicorn's handlers ended: once more after it
        # costs little (all written), and finishes what the handlers did since.
        with self._records_finished:
            if calls.active:
                calls.stop_all()
                calls.wait(timeout=min(1.0, max(0.0, hard_deadline - time.monotonic())))
            limiter.stop()  # what its leases left unused goes back to the shared buckets
            while not recorder.flush(min(1.0, max(0.0, hard_deadline - time.monotonic()))):
                self.notify()
                if time.monotonic() >= hard_deadline:
                    break
            recorder.drain(timeout=0.0)  # whatever is left goes to the journal
            telemetry.shutdown(timeout=0.4)  # the spans of what was written
            if db.reachable():  # the last warnings, briefly: the arbiter's SIGKILL is near
                srvlog.handler.write(timeout=1.0)

    def _finish_now(self) -> None:
        """Stop every call now, and write (or journal) the records within seconds."""
        from gateway import replay
        from gateway.calls import calls
        from gateway.limiter import limiter
        from gateway.recorder import recorder
        from gateway.telemetry import telemetry

        if calls.active:
            calls.stop_all()
            calls.wait(timeout=2.0)
        replay.stop_all()
        limiter.stop()  # what its leases left unused goes back to the shared buckets
        recorder.drain(timeout=2.0)
        telemetry.shutdown(timeout=0.4)
