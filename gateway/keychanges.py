"""The key-change channel: announcing a key's change and listening for others', with the
listener's re-subscribe and a call's catch-up.

An admin's change to a key (revoked, new limits) is published on the store's channel
(``gw:keys``) so that every worker of every instance forgets the key at once; each
worker's listener (one greenlet, in the limiter's group) calls the callbacks given to
``Limiter.on_key_change``. An announcement the store did not take is kept and sent once
it answers. A listener that lost its store subscribes again, soon then less often
(``resubscribe_wait``), and tells its callbacks that changes may have been missed
(``None``: forget every cached key). Without a shared store only this worker hears its
own announcements. Every store operation goes through the limiter's ``failopen.Guard``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import gevent

from gateway import instancestore
from gateway.failopen import OWED_MAX, UNSENT, WARN_EVERY, Guard
from gateway.ratelimit import StoreDown, Subscription

# Logged as the limiter, as before it was split: the logs and their readers know that name.
log = logging.getLogger("gateway.limiter")

# The key-change listener that lost its store tries to subscribe again after
# RESUBSCRIBE_FIRST seconds, then twice as long each time, up to REDIS_RETRY_AFTER
# (``resubscribe_wait``): a key changed while the store was away is announced to no
# one, and every worker serves it as it was until it subscribes again (and reads every
# key again). After a fixed REDIS_RETRY_AFTER (1 s), a key revoked while the instance
# store restarted (within about 0.5 s) still answered 200 about 0.8 s after the kill.
# A dead Redis is tried at 0.05, 0.15, 0.35, 0.75 and 1.55 s, then once a second as
# before; the instance store (a local connect, refused at once: no network, no server
# to load) every RESUBSCRIBE_LOCAL_EVERY, so a worker hears it within that of its start.
RESUBSCRIBE_FIRST = 0.05
RESUBSCRIBE_LOCAL_EVERY = 0.1
CATCH_UP_WAIT = 0.1  # seconds a call waits at most for the listener to apply changes


def resubscribe_wait(failures: int, most: float) -> float:
    """Seconds before the listener's next try to subscribe, after ``failures`` in a row."""
    return min(most, RESUBSCRIBE_FIRST * 2 ** max(0, failures - 1))


class KeyChanges:
    """One worker's end of the channel: its callbacks, the announcements the store has
    not taken yet, and the listener's subscription.

    ``background(fn, what)`` runs ``fn`` in the limiter's group (None outside gevent).
    ``first(message)`` is shown each message heard before the callbacks (None too), and
    keeps it from them by returning True (the limiter's own, about leases). ``back()``
    runs when the listener subscribes again after losing its store.
    """

    def __init__(
        self,
        background: Callable[[Callable[[], None], str], gevent.Greenlet | None],
        first: Callable[[str | None], bool],
        back: Callable[[], None],
    ) -> None:
        self._listeners: list[Callable[[str | None], None]] = []  # kept across ``configure``
        self._background = background
        self._first = first
        self._back = back

    def configure(self, guard: Guard, prefix: str, shared: bool) -> None:
        """Announce and listen on ``guard``'s store (to others only when ``shared``)."""
        self._guard = guard
        self.channel = f"{prefix}:keys"
        self._shared = shared
        self._unannounced: list[str] = []  # key changes Redis did not take, oldest first
        self._announcer: gevent.Greenlet | None = None  # sends them once Redis answers
        self._subscription: Subscription | None = None  # the listener's, if any

    def on_key_change(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(key_hash)`` when any worker announces a change to that key.

        ``callback(None)`` means announcements may have been missed (the store was away):
        forget every cached key. Without Redis only this worker hears its own announcements;
        the others' caches expire after CACHE_TTL. A listener added twice is called once.
        """
        if callback not in self._listeners:
            self._listeners.append(callback)

    def announce(self, key_hash: str) -> None:
        """Tell every worker of every instance that this key changed (revoked, new limits).

        Other announcements share the channel under names that are no key hash
        (``model_limits.CHANGED``); each listener picks out its own.
        """
        self._notify(key_hash)
        if not self._shared:
            return
        self._unannounced.append(key_hash)  # after any not sent yet: in order
        self._announce_owed()
        if self._unannounced:
            self._announce_later_on()

    def _announce_owed(self) -> None:
        """Publish the announcements not sent yet, in order, until Redis fails one.

        One Redis did not take is kept: the other workers' subscriptions may never have
        broken (a Redis that froze or stalled past REDIS_TIMEOUT), so nothing told them
        they missed a change, and they served the key as it was (a revoked key, old
        limits) until CACHE_TTL. Each is harmless to hear twice (one written before
        Redis froze runs when it resumes).
        """
        while self._unannounced:
            message = self._unannounced[0]
            guard = self._guard
            sent = guard.guarded("announce", UNSENT, guard.store.publish, self.channel, message)
            if sent is UNSENT:
                break
            if self._unannounced and self._unannounced[0] == message:
                del self._unannounced[0]
        if len(self._unannounced) > OWED_MAX:
            dropped = len(self._unannounced) - OWED_MAX
            del self._unannounced[:dropped]
            log.warning("limiter: %d key-change announcement(s) dropped", dropped)

    def _announce_later_on(self) -> None:
        """Send what ``_announce_owed`` kept once Redis answers, whatever calls come."""
        if self._announcer is None or self._announcer.dead:
            self._announcer = self._background(self._announce_later, "announcing")

    def _announce_later(self) -> None:
        while self._unannounced:
            guard = self._guard
            gevent.sleep(max(guard.retry_after, guard.down_until - time.monotonic()))
            self._announce_owed()

    def _heard(self, message: str | None) -> None:
        """An announcement on the channel (None: some may have been missed)."""
        if not self._first(message):
            self._notify(message)

    def _notify(self, key_hash: str | None) -> None:
        for callback in self._listeners:
            try:
                callback(key_hash)
            except Exception:
                log.exception("limiter: key-change callback failed")

    def catch_up(self) -> None:
        """Return once this worker has applied the key changes already sent to it.

        ``publish`` returns once Redis has written a change to every subscriber, so a
        call that comes after an admin's change was answered finds it at this worker's
        door, but not always applied: the loop may run the call's greenlet before the
        listener's (seen on a loaded machine: a revoked key let through). A call looks
        at its key after this (``KeyCache.get``): one system call when nothing waits;
        when something does, the listener runs first, for at most ``CATCH_UP_WAIT``.
        """
        subscription = self._subscription
        if subscription is None or not subscription.arrived():
            return
        deadline = time.monotonic() + CATCH_UP_WAIT
        while subscription is self._subscription and subscription.arrived():
            if time.monotonic() > deadline:
                return
            gevent.idle()  # once the loop has run what is ready: the listener among them

    def listen(self) -> None:
        """Hear the channel until killed, subscribing again whenever the store is lost."""
        try:
            self._listen_on()
        finally:  # stopped, or died: no listener for a call's ``catch_up`` to wait for
            self._subscription = None

    def _listen_on(self) -> None:
        missed, warned_at, failures = False, -math.inf, 0
        most = self._guard.retry_after
        if isinstance(self._guard.store, instancestore.InstanceStore):
            most = min(most, RESUBSCRIBE_LOCAL_EVERY)
        while True:
            since = math.inf  # when this round's subscription was made
            guard = self._guard
            try:
                subscription = self._subscription = guard.store.subscribe(self.channel)
                since = time.monotonic()
                if missed:
                    # The store answers: calls ask it again now, not when the
                    # REDIS_RETRY_AFTER a call's failure set runs out (and the slots
                    # below are taken again, not failed open).
                    guard.down_until = min(guard.down_until, since)
                    self._heard(None)
                    # The store may be one started again, empty: this worker's calls in
                    # flight hold their slots and claims again now, not at the keeper's
                    # next round (meanwhile other workers admitted past maxConcurrent).
                    self._back()
                while True:
                    message = subscription.next(1.0)
                    if message is not None:
                        self._heard(message)
            except StoreDown as exc:
                self._subscription = None
                missed = True
                now = time.monotonic()
                # A subscription that lasted starts the waits over; a try that failed,
                # or one dropped at once (a store that takes it and closes), doubles them.
                failures = 1 if now - since >= guard.retry_after else failures + 1
                if now - warned_at >= WARN_EVERY:
                    log.warning(
                        "limiter: key-change listener lost %s (%s); retrying",
                        guard.store_name,
                        exc,
                    )
                    warned_at = now
                gevent.sleep(resubscribe_wait(failures, most))
