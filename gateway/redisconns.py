"""The connections ``ratelimit.RedisStore`` keeps for its scripts, and what is posted on them.

``Connections`` sends commands on connections of a redis-py pool and reads their replies
with the connections' own methods, keeping each connection between calls; ``post``
sends without waiting, and the next exchange on the same connection reads what is owed.
It imports no redis: the pool is handed to it, and so are redis-py's exception types
(``Errors``), by ``ratelimit``, which stays the only redis importer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


class Errors(NamedTuple):
    """The exceptions of redis-py's that ``Connections`` tells apart."""

    closed: type[Exception]  # redis.ConnectionError: the connection failed or was closed
    refused: type[Exception]  # redis.ResponseError: Redis answered with an error
    no_script: type[Exception]  # redis.exceptions.NoScriptError: EVALSHA of a script it lacks


_forks = 0  # forks into this process since import: kept sockets are then the parent's


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class Connections:
    """Scripts sent and read on connections of the client's pool, kept here between calls.

    redis-py's way to run a command (``client.evalsha``, a script object, a pipeline)
    costs about 60 µs of CPU around a round trip that takes about 100: its pool checks a
    connection out under a lock and polls it for stale bytes, then come its retry, event
    and metrics layers. That was half of what a limit added to a call. Here a command is
    packed, sent and read by the connection's own methods, and the connection waits in
    ``_idle`` for the next command; redis-py still connects (password, TLS, Sentinel's
    master), encodes and parses (with hiredis, its parser in C, where installed:
    requirements.txt has it).

    ``post`` sends commands whose replies nobody waits for (what a finished call owes):
    they go out at once, and their replies are read by the next exchange on the same
    connection, which goes back to the head of ``_idle`` for it. A round trip's cost to
    the worker is mostly waiting for the reply (the hub's poll, a wake-up, a read): a
    posted command shares its wake-up with the next exchange. Each new connection first
    runs the ``opening`` commands (the store's ``SCRIPT LOAD``s), so a posted script is
    known to the Redis it reaches. A posted reply that is an error is passed to ``lost``,
    except ``NoScriptError`` (``SCRIPT FLUSH`` meanwhile: the command never ran): it is
    kept in ``rerun`` for the store to load its script and run it again.

    A kept connection that Redis closed meanwhile (a restart, the server's idle
    ``timeout``) fails at once when used; the command is then sent once more on a
    connection just made, where redis-py's pool would have noticed at checkout. A failed
    exchange never comes back to ``_idle``: its next reply could be the one that was
    late (redis-py disconnects it too). Commands posted on it whose replies were not read
    may or may not have run: they are passed to ``lost``, never sent again from here
    (the store's owner sends again those that are harmless to run twice).
    """

    IDLE = 64  # connections kept; more at once are made, and given back to the pool
    OWED = 64  # posted commands a connection holds unread at most; then they are read

    def __init__(
        self,
        pool: Any,
        errors: Errors,
        lost: Callable[[Sequence[Sequence[Any]], Exception], None],
        opening: Sequence[Sequence[Any]] = (),
        harmless: Callable[[Sequence[Any]], bool] = lambda command: False,
    ) -> None:
        self._pool = pool
        self._errors = errors
        self._lost = lost
        self._opening = opening  # sent on each new connection first (SCRIPT LOAD)
        self._harmless = harmless  # a posted command that may be sent again if lost
        self._idle: list[Any] = []
        self._owed: dict[Any, list[Sequence[Any]]] = {}  # posted, replies not read yet
        self.rerun: list[Sequence[Any]] = []  # posted commands Redis had no script for
        self._forks = _forks  # not os.getpid() per command: a system call each

    def _take(self) -> tuple[Any, bool]:
        """A connection for the next write, and whether it was kept (the last one given
        back first: a posted command's replies are read by the next exchange)."""
        if self._forks != _forks:  # forked: the sockets are the parent's
            self._idle, self._owed, self._forks = [], {}, _forks
        if self._idle:
            return self._idle.pop(), True
        return self._new(), False

    def _new(self) -> Any:
        """A connection of the pool's, once it has answered the opening commands."""
        conn = self._pool.get_connection()
        if self._opening:
            try:
                self._send(conn, self._opening)
                failed = [
                    r for r in self._read(conn, len(self._opening)) if isinstance(r, Exception)
                ]
            except BaseException as exc:
                self._drop(conn, exc)
                raise
            if failed:
                self._drop(conn, failed[0])
                raise failed[0]
        return conn

    def exchange(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one write and read their replies, in order: each reply is
        the value, or the ``ResponseError`` that Redis answered in its place."""
        conn, replies = self._on_a_connection(self._send_and_read, commands)
        if len(self._idle) < self.IDLE:
            self._idle.append(conn)
        else:
            self._pool.release(conn)
        return replies

    def post(self, commands: Sequence[Sequence[Any]]) -> None:
        """Send ``commands`` in one write and go on; the next exchange reads their replies."""
        conn, _ = self._on_a_connection(self._send, commands)
        owed = self._owed.setdefault(conn, [])
        owed.extend(commands)
        if len(owed) >= self.OWED:  # no round trip read them (a key with no limits)
            try:
                self._read_owed(conn)
            except BaseException as exc:  # reported lost; this caller's were sent
                self._drop(conn, exc)
                return
        self._idle.append(conn)  # kept even past IDLE: its replies are to be read

    def _on_a_connection(
        self, work: Callable[[Any, Sequence[Sequence[Any]]], T], commands: Sequence[Sequence[Any]]
    ) -> tuple[Any, T]:
        """``work(connection, commands)`` on a kept connection, and once more on a new one
        if Redis had closed the kept one (it fails at once: nothing sent on it ran). A
        connection that failed is dropped. Commands posted on the closed one that are
        ``harmless`` to run twice (a slot or a request id given back) go first on the new
        one: the commands after them may need what they give back."""
        conn, kept = self._take()
        try:
            return conn, work(conn, commands)
        except self._errors.closed as exc:
            again, rest = [], []
            for command in self._owed.get(conn, []):
                (again if self._harmless(command) else rest).append(command)
            if again and kept:
                self._owed[conn] = rest
            self._drop(conn, exc)
            if not kept:
                raise
        except BaseException as exc:
            self._drop(conn, exc)
            raise
        conn = self._new()
        try:
            if again:
                self._send(conn, again)  # posted: read before the replies of ``commands``
                self._owed[conn] = again
            return conn, work(conn, commands)
        except BaseException as exc:
            self._drop(conn, exc)
            raise

    @staticmethod
    def _send(conn: Any, commands: Sequence[Sequence[Any]]) -> None:
        conn.send_packed_command(conn.pack_commands(commands), check_health=False)

    def _read(self, conn: Any, count: int) -> list[Any]:
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(conn.read_response())
            except self._errors.refused as exc:  # the whole reply was read: still in step
                replies.append(exc)
        return replies

    def _send_and_read(self, conn: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands``; read the replies of those posted on ``conn`` before, then
        theirs."""
        self._send(conn, commands)
        self._read_owed(conn)
        return self._read(conn, len(commands))

    def _read_owed(self, conn: Any) -> None:
        """Read the replies of the commands posted on ``conn``; pass on what failed."""
        owed = self._owed.get(conn)
        if not owed:
            return
        replies = self._read(conn, len(owed))
        del self._owed[conn]
        for command, reply in zip(owed, replies, strict=True):
            if isinstance(reply, self._errors.no_script):
                self.rerun.append(command)
            elif isinstance(reply, Exception):
                self._lost([command], reply)

    def _drop(self, conn: Any, exc: BaseException) -> None:
        """Close a failed connection; what was posted on it and not answered is lost."""
        conn.disconnect()
        self._pool.release(conn)
        owed = self._owed.pop(conn, None)
        if owed:
            self._lost(owed, exc if isinstance(exc, Exception) else Exception(repr(exc)))
