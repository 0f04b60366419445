"""The limits of one instance's workers without Redis: the store process they all ask.

Without ``REDIS_URL`` each worker used to keep its limits in its own memory, so an
instance of two workers let a key make up to twice its RPM and its ``maxConcurrent``,
and ran a request id's repeat that reached the other worker anew. Now, with more than
one worker and no Redis, gunicorn's master (``storekeeper``) starts a store process
for the instance (``storeprocess``), starts it again if it dies, and stops it at exit;
``INSTANCE_STORE`` names its Unix socket, in a directory only this user can enter.
Each worker's ``Limiter`` uses it as it uses Redis (``InstanceStore`` offers
``RedisStore``'s operations): the same decisions on one clock, leases, the key-change
channel (a revoked key is refused by every worker of the instance at once), and the
same failure: away, slower than ``INSTANCE_STORE_TIMEOUT`` or restarting, every
operation raises ``StoreDown`` and the limiter fails open, trying again
``REDIS_RETRY_AFTER`` seconds later. Started again
empty, the store keeps claims.lua's marks, so a repeat of a call still in flight asks
the records, and the workers take their slots and claims again once they hear it is back.

One connection a worker, through ``pipelining`` in a gevent worker (greenlets that ask
while a round trip is in flight share the next). What a finished call owes is posted
(``post_all``): written, not answered. Frames: ``storewire``.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import gevent
import gevent.lock
from gevent import monkey

from gateway import pipelining, sockets, storewire
from gateway.buckets import Bucket, Budget, Claim, Slot, Verdict
from gateway.ratelimit import StoreDown

log = logging.getLogger(__name__)

_FAILURES = (OSError, EOFError, ValueError, TypeError, pipelining.Stopped)
SUBSCRIBE_TIMEOUT = 1.0  # seconds a subscription's answer, or a message's rest, may take
# Charges posted wait up to POST_WAIT seconds to share a frame, POST_BATCH at most: at
# 10 clients the store's CPU a call was 100 µs when each had a frame, 55 at 2 ms, 30
# at 10 ms (a TPM charge reaches other workers that much later; leases see it later).
POST_WAIT, POST_BATCH = 0.01, 200


def _flusher_died(greenlet: gevent.Greenlet) -> None:
    log.error("instance store: the charges' sender died", exc_info=greenlet.exc_info)


def _down(exc: BaseException) -> StoreDown:
    return StoreDown(f"the instance store: {type(exc).__name__}: {exc}")


class InstanceStore:
    """``RedisStore``'s operations, run by the instance's store process (see above)."""

    def __init__(self, path: str, timeout: float, connect_timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # Posts are never answered, so none is lost unseen: kept for the limiter's wiring.
        self.on_lost: Callable[[int, list[tuple[str, tuple]], Exception], None] = (
            lambda count, again, exc: None
        )
        self._sock: socket.socket | None = None
        self._exchange: Callable[[Sequence[tuple]], list[Any]] = self._round_trip
        self._pipeline: pipelining.Pipeline | None = None
        self._writing: Any = nullcontext()
        self._posted: list[tuple] = []  # charges waiting to share a frame (``post_all``)
        # The flusher the waiting charges have (a gevent worker's): none once it has
        # begun to send them.
        self._flusher: gevent.Greenlet | None = None
        if monkey.is_module_patched("socket"):
            self._pipeline = pipelining.Pipeline(self._round_trip)
            self._exchange = self._pipeline.exchange
            self._writing = gevent.lock.Semaphore()  # a frame is never cut by another

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self.path)
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def _connection(self) -> socket.socket:
        if self._sock is not None and sockets.readable(self._sock):
            # Between frames the store sends nothing: the end (or bytes) here is a
            # store gone, one started again, and nothing sent on it ran. A new
            # connection, as a Redis client's pool notices at checkout.
            self._drop()
        if self._sock is None:
            self._sock = self._connect(self.timeout)
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @contextmanager
    def _dropped_on_failure(self) -> Iterator[None]:
        """Whatever fails on the connection drops it, a greenlet killed mid-frame too
        (the rest of the frame is unread); a failure of the store is ``StoreDown``."""
        try:
            yield
        except BaseException as exc:
            self._drop()
            if isinstance(exc, _FAILURES):
                raise _down(exc) from exc
            raise

    def _round_trip(self, operations: Sequence[tuple]) -> list[Any]:
        """One frame of operations out, one of results back, on the one connection."""
        with self._dropped_on_failure():
            sock = self._connection()
            posted, self._posted = self._posted, []  # sent before: run before these
            with self._writing:
                sock.sendall(
                    (storewire.frame(("post", posted)) if posted else b"")
                    + storewire.frame(list(operations))
                )
            results = storewire.receive(sock)
        if not isinstance(results, list) or len(results) != len(operations):
            self._drop()
            raise StoreDown("the instance store answered out of step")
        return results

    def run_all(self, operations: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Several operations (``(method name, args)``) in one round trip; their results."""
        try:
            replies = self._exchange([storewire.encode(name, args) for name, args in operations])
        except pipelining.Stopped as exc:
            raise _down(exc) from exc
        out = []
        for (name, _), (ok, result) in zip(operations, replies, strict=True):
            if not ok:
                raise StoreDown(f"the instance store refused {name}: {result}")
            out.append(storewire.decode(name, result))
        return out

    def post_all(self, operations: Sequence[tuple[str, tuple]]) -> None:
        """``run_all`` without an answer: written now, run before anything this worker
        sends later. With a round trip in flight they join the next one, as with Redis.

        Charges alone (a call's tokens, a lease's unused requests) wait up to
        ``POST_WAIT`` for others to share their frame, sent before anything sent later:
        one write and one wake-up of the store for many calls, where each cost the store
        about 100 µs of CPU (other workers see a call's tokens that much later). What
        else a call owes (its slot, its request id's answer, its spend) is in the store
        before its answer leaves, as with Redis."""
        if self._pipeline is not None and all(name == "charge" for name, _ in operations):
            self._posted += [storewire.encode(name, args) for name, args in operations]
            if len(self._posted) >= POST_BATCH:
                self.flush()
            elif self._flusher is None or self._flusher.dead:  # (dead: killed asleep)
                self._flusher = gevent.spawn(self._flush_soon)
                self._flusher.link_exception(_flusher_died)
            return
        if self._pipeline is not None and self._pipeline.busy:
            self.run_all(operations)
            return
        self._post([storewire.encode(name, args) for name, args in operations])

    def _flush_soon(self) -> None:
        gevent.sleep(POST_WAIT)
        # From here on a charge posted waits for a flusher of its own: this one's send
        # may yield, and it is not dead until the hub has run its links.
        self._flusher = None
        try:
            self.flush()
        except StoreDown as exc:
            self.on_lost(1, [], exc)  # charges: not sent again (one may have run)

    def flush(self) -> None:
        """Send the charges waiting to share a frame (StoreDown if the store is away)."""
        if self._posted:
            self._post([])

    def _post(self, encoded: list[tuple]) -> None:
        posted, self._posted = self._posted + encoded, []
        with self._dropped_on_failure():
            # A round trip in flight has the connection: its reply may be what waits on
            # it, which ``_connection`` would take for a store gone.
            busy = self._pipeline is not None and self._pipeline.busy and self._sock is not None
            sock = self._sock if busy else self._connection()
            assert sock is not None
            with self._writing:
                storewire.send(sock, ("post", posted))

    def _one(self, name: str, *args: Any) -> Any:
        return self.run_all([(name, args)])[0]

    def admit(
        self,
        keys: Sequence[str],
        buckets: Sequence[Bucket],
        slot: Slot | None = None,
        budget: Budget | None = None,
    ) -> Verdict:
        """See ``LocalStore.admit``."""
        return self._one("admit", keys, buckets, slot, budget)

    def charge(self, key: str, bucket: Bucket, amount: float) -> float:
        """See ``LocalStore.charge``."""
        return self._one("charge", key, bucket, amount)

    def peek(self, keys: Sequence[str], buckets: Sequence[Bucket]) -> tuple[float, ...]:
        """See ``LocalStore.peek``."""
        return self._one("peek", keys, buckets)

    def acquire(self, key: str, member: str, limit: int, ttl: float) -> tuple[bool, int]:
        """See ``LocalStore.acquire``."""
        return self._one("acquire", key, member, limit, ttl)

    def refresh(self, key: str, member: str, ttl: float) -> bool:
        """See ``LocalStore.refresh``."""
        return self._one("refresh", key, member, ttl)

    def release(self, key: str, member: str) -> int:
        """See ``LocalStore.release``."""
        return self._one("release", key, member)

    def claim(
        self,
        key: str,
        uid: str,
        ttl: float,
        age: float = 0.0,
        mark: str | None = None,
        grace: float = 0.0,
    ) -> Claim | None:
        """See ``RedisStore.claim``: this store too may start empty."""
        return self._one("claim", key, uid, ttl, age, mark, grace)

    def keep_claim(self, key: str, uid: str, ttl: float) -> bool:
        """See ``LocalStore.keep_claim``."""
        return self._one("keep_claim", key, uid, ttl)

    def settle(self, key: str, uid: str, answer: str, ttl: float) -> bool:
        """See ``LocalStore.settle``."""
        return self._one("settle", key, uid, answer, ttl)

    def unclaim(self, key: str, uid: str) -> bool:
        """See ``LocalStore.unclaim``."""
        return self._one("unclaim", key, uid)

    def add(self, key: str, amount: int, ttl: float) -> int:
        """See ``LocalStore.add``."""
        return self._one("add", key, amount, ttl)

    def raise_to(self, key: str, amount: int, ttl: float) -> int:
        """See ``LocalStore.raise_to``."""
        return self._one("raise_to", key, amount, ttl)

    def total(self, key: str) -> int:
        """See ``LocalStore.total``."""
        return self._one("total", key)

    def publish(self, channel: str, message: str) -> None:
        """Send ``message`` to every subscriber of ``channel``; return once the store has
        written it to each of them."""
        self._one("publish", channel, message)

    def subscribe(self, channel: str) -> InstanceSubscription:
        """Subscribe to ``channel`` on a connection of its own."""
        try:
            sock = self._connect(SUBSCRIBE_TIMEOUT)
            storewire.send(sock, ("subscribe", channel))
            if storewire.receive(sock) is not True:
                sock.close()
                raise StoreDown("the instance store refused a subscription")
        except _FAILURES as exc:
            raise _down(exc) from exc
        return InstanceSubscription(sock)


class InstanceSubscription:
    """One channel's messages (``subscription.Subscription``'s interface). A store that
    dies closes the connection: the next ``next`` says so (``StoreDown``)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def next(self, timeout: float) -> str | None:
        """The next message, waiting up to ``timeout`` seconds; None if none came."""
        try:
            if not _wait_readable(self._sock, timeout):
                return None
            message = storewire.receive(self._sock)
        except _FAILURES as exc:
            self._sock.close()
            raise _down(exc) from exc
        if not (isinstance(message, list) and len(message) == 2 and message[0] == "message"):
            self._sock.close()
            raise StoreDown("the instance store sent a subscriber something else")
        return str(message[1])

    def arrived(self) -> bool:
        """Whether bytes wait on the subscription's socket (a system call, no switch)."""
        try:
            return sockets.readable(self._sock)
        except (OSError, ValueError):  # closed meanwhile: ``next`` says so
            return False


def _wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Wait up to ``timeout`` for bytes (or the end) on ``sock``: gevent's wait in a
    gevent process (after a look: what is there already is not waited for), the
    system's elsewhere. poll, not select: no limit on the descriptor's number."""
    if not monkey.is_module_patched("select"):
        return sockets.readable(sock, timeout)
    if sockets.readable(sock):
        return True
    import gevent.select

    poller = gevent.select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def open_store(config: Mapping[str, Any]) -> InstanceStore | None:
    """The instance's store (``INSTANCE_STORE``, set by gunicorn's master), unless Redis
    is the store or there is none."""
    path = config.get("INSTANCE_STORE")
    if not path or path == "off" or config.get("REDIS_URL"):
        return None
    timeout = float(config["INSTANCE_STORE_TIMEOUT"])
    return InstanceStore(str(path), timeout, float(config["REDIS_CONNECT_TIMEOUT"]))
