"""A subscriber to one channel of Redis, for ``ratelimit.RedisStore.subscribe``.

``Subscription`` reads one channel's messages on a redis-py ``PubSub`` it is handed,
and PINGs on it, so that a connection that died without a word is noticed. It imports
no redis: what it catches and raises (redis-py's exceptions and ``StoreDown``) is handed
to it by ``ratelimit`` (``Errors``), which stays the only redis importer.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from gateway import sockets


class Errors(NamedTuple):
    """What a ``Subscription`` catches and what it raises, as ``ratelimit`` hands them over."""

    failures: tuple[type[BaseException], ...]  # ratelimit._FAILURES: Redis away or slow
    down: type[Exception]  # ratelimit.StoreDown: raised for any of them
    timeout: type[Exception]  # redis.TimeoutError: a PING left unanswered


class Subscription:
    """One channel's messages: ``next`` waits for the next one, ``arrived`` says without
    waiting whether one has come that ``next`` has not returned yet.

    A subscriber only reads: a connection that died without a word (a partition, a
    NAT or load balancer that dropped it while idle, a host gone) never fails, and the
    worker heard no change again, with nothing to tell it that it missed them. So
    ``next`` sends a PING every ``PING_EVERY`` seconds, and one still unanswered at the
    next is ``StoreDown`` (the listener subscribes again, and forgets every cached key).
    """

    PING_EVERY = 5.0

    def __init__(self, pubsub: Any, errors: Errors) -> None:
        self._pubsub = pubsub
        self._errors = errors
        self._pinged: float | None = None  # when the PING not answered yet was sent
        self._ping_at = time.monotonic() + self.PING_EVERY

    def next(self, timeout: float) -> str | None:
        """The next message, waiting up to ``timeout`` seconds; None if none came."""
        try:
            self._ping()
            message = self._pubsub.get_message(timeout=timeout)
        except self._errors.failures as exc:
            self._pubsub.close()
            raise self._errors.down(f"{type(exc).__name__}: {exc}") from exc
        if message is not None and message.get("type") == "pong":
            self._pinged = None
        if message is None or message.get("type") != "message":
            return None
        return message["data"].decode()

    def _ping(self) -> None:
        now = time.monotonic()
        if now < self._ping_at:
            return
        if self._pinged is not None:
            raise self._errors.timeout(f"no answer to a PING in {now - self._pinged:.1f} s")
        self._pubsub.ping()
        self._pinged, self._ping_at = now, now + self.PING_EVERY

    def arrived(self) -> bool:
        """Whether bytes wait on the subscription's socket (a system call, no switch)."""
        # redis-py's connection keeps its socket in ``_sock`` (None once closed); a
        # Cluster's pubsub has its node's connection once subscribed.
        sock = getattr(getattr(self._pubsub, "connection", None), "_sock", None)
        if sock is None:
            return False
        try:
            return sockets.readable(sock)
        except (OSError, ValueError):  # closed meanwhile: ``next`` says so
            return False
