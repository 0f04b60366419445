"""The gateway's log lines to stdout and stderr, written without ever waiting for the reader.

logging's and gunicorn's handlers write each line to the process's stdout or stderr, and
the write returns once the system has taken it. Where that is a pipe or a socket (a
container's log driver, systemd's journal, ``| tee``) whose reader falls behind, it
fills (64 KB for a Linux pipe) and the write waits: in a worker, its loop with it, every
call of the worker stopped until the reader catches up, and for good if it never does;
in gunicorn's master, the master, which then neither replaces a dead worker nor passes
on a SIGTERM (a container's stop ended in its SIGKILL, calls in flight cut off).

An ``Outlet`` writes a line at once when the reader has room for it, as before. When it
has none, the line waits in memory, in order with every later one: a worker's loop writes
them as room comes; the master, which has no loop, writes them at its next line and at
exit. Past ``LOG_BACKLOG`` bytes waiting, new lines are dropped whole and counted
(a worker's in ``gateway_log_lines_dropped_total``); once the backlog is out, a line says
how many. Only the process's own way into the pipe waits for nothing: a pipe or a
terminal is opened again through /proc (an open file description of its own, made
non-blocking), a socket is written with ``MSG_DONTWAIT``; every other process writing to
it writes as before. A regular file is left as it is: its writes wait for the disk, not
for a reader.

``install`` runs in gunicorn's master as it starts (gunicorn.conf.py's ``on_starting``,
through ``accesslog.RedactingLogger.never_wait_for_readers``), and in each worker once
its app is built (``GatewayWorker.load_wsgi``), with the worker's loop: every handler
writing to stdout or stderr, ``sys.stdout`` and ``sys.stderr`` (gevent's tracebacks,
``print``) write through an outlet from then on. At exit, what still waits gets
``EXIT_WAIT`` seconds.
"""

from __future__ import annotations

import _socket
import atexit
import functools
import io
import logging
import os
import select
import socket
import stat
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent import monkey

log = logging.getLogger(__name__)

EXIT_WAIT = 1.0  # seconds the lines still waiting at exit get
# Waiting lines are written several at a time, in at most PIPE_BUF bytes: a pipe takes
# such a write whole or not at all, so no other process's line lands inside it (the
# master and every worker write to the same pipe).
_GATHER = select.PIPE_BUF
_WRITABLE = 2  # libev's EV_WRITE

# Taken by any thread that logs (the database's pool threads too), never held across a
# switch or a wait: a native lock, not gevent's; reentrant, for a signal's handler that
# logs while its thread is in the middle of a write (gunicorn's master reaps workers in
# its SIGCHLD handler, and says so).
_native_lock = monkey.get_original("_thread", "RLock")
_native_sleep = monkey.get_original("time", "sleep")


class Outlet(io.TextIOBase):
    """One of the process's output streams, written without waiting for its reader.

    ``send(data)`` writes what the reader has room for and returns how many bytes that
    was, raising ``BlockingIOError`` for none; ``fd`` is the descriptor it writes to,
    ``fileno`` the stream's own (1 or 2). With ``loop`` (a worker's), the loop watches
    ``fd`` while lines wait and writes them; without, the next write does.
    """

    def __init__(
        self,
        name: str,
        send: Callable[[bytes], int],
        fd: int,
        fileno: int,
        backlog: int,
        on_dropped: Callable[[str, int], None] | None = None,
        loop: Any = None,
    ) -> None:
        super().__init__()
        self.name = name  # "stdout" or "stderr"
        self._send = send
        self._fd = fd
        self._fileno = fileno
        self._backlog = backlog
        self._on_dropped = on_dropped if loop is not None else None
        self._loop = loop
        self._lock = _native_lock()
        self._waiting: deque[bytes] = deque()
        self._size = 0  # bytes waiting
        self._sending = False  # a write is under way: one that comes meanwhile waits
        self._unreported = 0  # lines dropped since the last report
        self._uncounted = 0  # lines dropped not yet given to on_dropped
        self._counting = False  # a count is due in the loop
        self._watching = False  # the loop watches ``fd`` (or is about to)
        self._watch: Any = None
        self.dropped = 0  # lines dropped in all

    def forget(self) -> None:
        """Start empty (in a forked child: what waits is its parent's to write)."""
        self._lock = _native_lock()
        self._waiting.clear()
        self._size = 0
        self._sending = self._counting = self._watching = False
        self._unreported = self._uncounted = 0
        self._watch = None

    # -- what a stream is asked ---------------------------------------------------------

    encoding = "utf-8"
    errors = "backslashreplace"

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fileno

    def isatty(self) -> bool:
        return os.isatty(self._fileno)

    def flush(self) -> None:
        """Nothing to do: a line goes out at once or waits for the loop, never for this."""

    @property
    def waiting(self) -> int:
        """Bytes waiting for the reader to make room."""
        return self._size

    def write(self, text: Any) -> int:
        data = text.encode("utf-8", "backslashreplace") if isinstance(text, str) else bytes(text)
        if not data:
            return len(text)
        with self._lock:
            if self._sending:  # a handler's line in the middle of a write: after it
                self._queue(data)
                return len(text)
            self._sending = True
            try:
                self._write(data)
            finally:
                self._sending = False
        return len(text)

    # -- under the lock -----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._waiting and self._loop is None:  # no loop to write them: now
            self._write_waiting()
            self._report_here()
        if self._waiting:  # behind what waits
            self._queue(data)
            return
        sent = self._try(data)
        if sent is None:
            self._drop()
        elif sent < len(data):
            if sent == 0 and len(data) > self._backlog:
                self._drop()
            else:  # a line begun is finished first: the reader must not get half
                self._keep(data[sent:], first=True)

    def _queue(self, data: bytes) -> None:
        if self._size + len(data) > self._backlog:
            self._drop()
        else:
            self._keep(data)

    def _try(self, data: bytes) -> int | None:
        """Bytes of ``data`` the reader took now; None if the stream is gone (EPIPE...)."""
        try:
            return self._send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return None

    def _keep(self, data: bytes, first: bool = False) -> None:
        if first:
            self._waiting.appendleft(data)
        else:
            self._waiting.append(data)
        self._size += len(data)
        if self._loop is not None and not self._watching:
            self._watching = True
            self._loop.run_callback_threadsafe(self._watch_for_room)

    def _drop(self, lines: int = 1) -> None:
        self.dropped += lines
        self._unreported += lines
        self._uncounted += lines
        if not self._counting and self._on_dropped is not None:
            self._counting = True
            self._loop.run_callback_threadsafe(self._count)

    # -- in the loop --------------------------------------------------------------------

    def _watch_for_room(self) -> None:
        if self._watch is None:
            self._watch = self._loop.io(self._fd, _WRITABLE)
        self._watch.start(self._room)

    def _room(self) -> None:
        """The reader made room: write what waits; once all is out, stop watching."""
        with self._lock:
            self._sending = True
            try:
                self._write_waiting()
            finally:
                self._sending = False
            if self._waiting:
                return
            self._watch.stop()
            self._watching = False
            dropped, self._unreported = self._unreported, 0
        if dropped:
            gevent.spawn(self._report, dropped)

    def _report_here(self) -> None:
        """Without a loop: once what waits is out, say here how many lines were dropped."""
        if not self._waiting and self._unreported:
            note = f"gateway: {_dropped(self._unreported, self.name, self._backlog)}\n"
            self._unreported = 0
            self._queue(note.encode())
            self._write_waiting()

    def _write_waiting(self) -> None:
        """Write what waits, several lines a system call (``_GATHER``), until the reader
        has no more room."""
        waiting = self._waiting
        while waiting:
            if len(waiting) > 1 and len(waiting[0]) + len(waiting[1]) <= _GATHER:
                parts, size = [], 0
                while waiting and size + len(waiting[0]) <= _GATHER:
                    parts.append(waiting.popleft())
                    size += len(parts[-1])
                waiting.appendleft(b"".join(parts))
            head = waiting[0]
            sent = self._try(head)
            if sent is None:  # the stream is gone: what waits is dropped
                self._drop(max(1, sum(part.count(b"\n") for part in waiting)))
                self._size = 0
                waiting.clear()
                return
            self._size -= sent
            if sent < len(head):
                if sent:
                    waiting[0] = head[sent:]
                return
            waiting.popleft()

    def _count(self) -> None:
        with self._lock:
            counted, self._uncounted = self._uncounted, 0
            self._counting = False
        if counted and self._on_dropped is not None:
            self._on_dropped(self.name, counted)

    def _report(self, dropped: int) -> None:
        log.warning("gateway: %s", _dropped(dropped, self.name, self._backlog))

    # -- at exit ------------------------------------------------------------------------

    def finish(self, deadline: float) -> bool:
        """Write what waits until ``deadline`` (monotonic); True if all went out.

        A worker's lines dropped and not reported yet are reported first (a warning,
        through logging: to stderr); the master's, once what waits is out.
        """
        if self._loop is not None:
            with self._lock:
                dropped, self._unreported = self._unreported, 0
            if dropped:
                self._report(dropped)
        while True:
            with self._lock:
                before = self._size
                self._sending = True
                try:
                    self._write_waiting()
                    self._report_here()
                finally:
                    self._sending = False
                if not self._waiting:
                    return True
                moved = self._size < before
            if time.monotonic() >= deadline:
                return False
            if not moved:
                _native_sleep(0.005)


def _dropped(lines: int, name: str, backlog: int) -> str:
    return f"{lines} log lines to {name} were dropped: its reader fell {backlog} bytes behind"


def outlet(
    fileno: int,
    name: str,
    backlog: int,
    on_dropped: Callable[[str, int], None] | None = None,
    loop: Any = None,
) -> Outlet | None:
    """An outlet for the process's descriptor ``fileno``; None where its writes do not
    wait for a reader (a regular file) or no way of the process's own into it is found."""
    try:
        mode = os.fstat(fileno).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        # The C socket type: gevent's would make the shared description non-blocking.
        sock = _socket.socket(fileno=os.dup(fileno))  # open as long as ``send`` holds it
        send = functools.partial(_send_now, sock)
        return Outlet(name, send, sock.fileno(), fileno, backlog, on_dropped, loop)
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        try:
            own = os.open(
                f"/proc/self/fd/{fileno}",
                os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
            )
        except OSError:  # no /proc, or no reader left: as before
            return None
        return Outlet(
            name, functools.partial(os.write, own), own, fileno, backlog, on_dropped, loop
        )
    return None


def _send_now(sock: Any, data: bytes) -> int:
    return sock.send(data, socket.MSG_DONTWAIT)


def install(
    backlog: int, on_dropped: Callable[[str, int], None] | None = None, loop: Any = None
) -> list[Outlet]:
    """Write this process's stdout and stderr through outlets: every logging handler
    writing to them, and ``sys.stdout`` and ``sys.stderr``. ``loop``: a worker's (in its
    thread), which writes what waits; None in gunicorn's master."""
    made: dict[int, Outlet] = {}
    for fileno, name, stream in ((1, "stdout", sys.stdout), (2, "stderr", sys.stderr)):
        found = outlet(fileno, name, backlog, on_dropped, loop)
        if found is None:
            continue
        made[fileno] = found
        if stream is not None and _fileno(stream) == fileno:
            stream.flush()
            setattr(sys, name, found)
    if not made:
        return []
    loggers = [logging.getLogger()] + [
        each
        for each in logging.Logger.manager.loggerDict.values()
        if isinstance(each, logging.Logger)
    ]
    for each in loggers:
        for handler in each.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                found = made.get(_fileno(handler.stream))  # type: ignore[arg-type]
                if found is not None:
                    handler.setStream(found)
    outlets = list(made.values())
    atexit.register(finish, outlets)
    if loop is None:  # a child forked from here writes its own lines, not these
        os.register_at_fork(after_in_child=lambda: [each.forget() for each in outlets])
    return outlets


def finish(outlets: list[Outlet], wait: float = EXIT_WAIT) -> bool:
    """Give what waits in ``outlets`` up to ``wait`` seconds in all; True if all went out."""
    deadline = time.monotonic() + wait
    done = True
    for each in outlets:
        done = each.finish(deadline) and done
    return done


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
