"""The instance store's process: ``python -m gateway.storeprocess SOCKET MASTER_PID``.

gunicorn's master starts it (``storekeeper``) when the instance runs more than one
worker and no Redis; the workers ask it (``instancestore``) what they would ask Redis.
It runs ``buckets.LocalStore`` (the arithmetic the Lua scripts mirror) on its own clock,
with claims.lua's marks (it may be started again, empty, while calls are in flight), and
carries the key-change channel: a ``publish`` is answered once the message is written to
every subscriber's connection (a subscriber that does not read for
``SUBSCRIBER_WRITE_TIMEOUT`` is dropped; it subscribes again and forgets what it cached).

One gevent loop, nothing patched: each connection has its greenlet, and each operation
runs whole before another starts, so the workers decide as one. Whatever a connection
sends, the store answers the others: an operation it cannot run is refused (``(False,
why)``), a frame it cannot read ends that connection. It leaves within
``PARENT_CHECK_EVERY`` of its master (even one killed with ``kill -9``), removing its
socket, the master's pid file beside it, and their directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import gevent
import gevent.lock
from gevent import socket as cooperative
from gevent.server import StreamServer

from gateway import storewire
from gateway.buckets import LocalStore

log = logging.getLogger(__name__)

PARENT_CHECK_EVERY = 1.0  # seconds between looks at whether the master still runs
SUBSCRIBER_WRITE_TIMEOUT = 1.0  # seconds a subscriber may leave a message unread
# Beside the socket: the store's pid, written by the master that started it
# (storekeeper.PID_FILE).
PID_FILE = "store.pid"

_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError)


class Store:
    """The store's state and its channels' subscribers."""

    def __init__(self, clock: Any = time.time) -> None:
        self.buckets = LocalStore(clock, marks=True)
        # channel -> connection -> the lock its writes take (a message is never cut)
        self.subscribers: dict[str, dict[Any, gevent.lock.Semaphore]] = {}

    def run(self, name: Any, args: Any) -> tuple[bool, Any]:
        """One operation a worker sent, checked: (True, its result) or (False, why not)."""
        known = storewire.OPERATIONS.get(name) if isinstance(name, str) else None
        if known is None or not isinstance(args, list):
            return False, f"no operation {name!r}"
        if not known[0] <= len(args) <= known[1]:
            return False, f"{name}: {len(args)} arguments"
        try:
            return True, storewire.result_out(self._run(name, args))
        except _ERRORS as exc:
            return False, f"{name}: {type(exc).__name__}: {exc}"

    def _run(self, name: str, args: list) -> Any:
        if name in ("admit", "peek"):
            keys, buckets, *rest = args
            return getattr(self.buckets, name)(
                list(keys), [storewire.bucket_in(b) for b in buckets], *rest
            )
        if name == "charge":
            key, bucket, amount, *low = args
            level = self.buckets.charge(key, storewire.bucket_in(bucket), amount)
            if low:  # as buckets.lua: announce a level at or below the floor
                floor, channel, message = low
                if level <= floor:
                    self.publish(channel, message)
            return level
        if name == "publish":
            return self.publish(*args)
        return getattr(self.buckets, name)(*args)

    def answer(self, operations: Any) -> list[tuple[bool, Any]]:
        """The results of a frame's operations."""
        if not isinstance(operations, list):
            raise ValueError("a frame that is not a list of operations")
        return [
            self.run(*operation)
            if isinstance(operation, list) and len(operation) == 2
            else (False, "an operation that is not (name, arguments)")
            for operation in operations
        ]

    def publish(self, channel: str, message: str) -> int:
        """Write ``message`` to every subscriber of ``channel``; how many took it."""
        if not isinstance(channel, str) or not isinstance(message, str):
            raise TypeError("a channel and a message are text")
        data = storewire.frame(("message", message))
        told = 0
        for conn, lock in list(self.subscribers.get(channel, {}).items()):
            try:
                with lock:
                    conn.sendall(data)
                told += 1
            except OSError as exc:  # gone, or too slow: it subscribes again
                log.warning("instance store: a subscriber dropped: %s", exc)
                self._unsubscribe(channel, conn)
                conn.close()
        return told

    def _unsubscribe(self, channel: str, conn: Any) -> None:
        held = self.subscribers.get(channel, {})
        held.pop(conn, None)
        if not held:
            self.subscribers.pop(channel, None)

    def serve(self, conn: Any, _address: Any = None) -> None:
        """One connection: its frames answered in order until it closes."""
        try:
            while True:
                try:
                    frame = storewire.receive(conn)
                except EOFError:
                    return
                if isinstance(frame, list) and len(frame) == 2 and frame[0] == "post":
                    self.answer(frame[1])
                elif isinstance(frame, list) and len(frame) == 2 and frame[0] == "subscribe":
                    self._subscribed(conn, frame[1])
                    return
                else:
                    storewire.send(conn, self.answer(frame))
        except (OSError, ValueError, EOFError, TypeError, RecursionError) as exc:
            log.warning("instance store: a connection ended: %s: %s", type(exc).__name__, exc)
        finally:
            conn.close()

    def _subscribed(self, conn: Any, channel: Any) -> None:
        """A subscriber's connection: told ``True``, then its channel's messages, until
        it closes (it sends nothing more)."""
        if not isinstance(channel, str):
            raise ValueError("a channel is text")
        conn.settimeout(SUBSCRIBER_WRITE_TIMEOUT)
        lock = gevent.lock.Semaphore()
        with lock:
            storewire.send(conn, True)
        self.subscribers.setdefault(channel, {})[conn] = lock
        try:
            while True:  # its end; the timeout is for the writes
                with contextlib.suppress(TimeoutError):
                    if not conn.recv(4096):
                        return
        finally:
            self._unsubscribe(channel, conn)


def _listen(path: str) -> Any:
    """The store's socket at ``path``, there only once it listens (a stale one from a
    dead store is replaced)."""
    new = path + ".new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(new)
    sock = cooperative.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(new)
    os.chmod(new, 0o600)
    sock.listen(128)
    os.replace(new, path)
    return sock


def serve(path: str, parent: int) -> None:
    """Answer the workers at ``path`` until process ``parent`` (the master) is gone,
    then remove the socket, the pid file and their directory."""
    server = StreamServer(_listen(path), Store().serve)
    server.start()
    try:
        while os.getppid() == parent:
            gevent.sleep(PARENT_CHECK_EVERY)
    finally:
        server.stop(timeout=0)
        directory = os.path.dirname(path)
        pid_file = os.path.join(directory, PID_FILE)
        for remove, what in ((os.unlink, path), (os.unlink, pid_file), (os.rmdir, directory)):
            with contextlib.suppress(OSError):
                remove(what)


def main(argv: Sequence[str]) -> None:
    """``python -m gateway.storeprocess SOCKET MASTER_PID``."""
    logging.basicConfig(level=logging.INFO, format="[instance store] %(message)s")
    serve(argv[0], int(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
