"""Work handed to the hub's thread pool while the greenlet that asked waits for it.

A blocking call in C that lets go of the GIL (SQLite's statements, the system's name
lookup) runs in a pool thread, and the worker's other greenlets run meanwhile. The hub
learns that a pool task ended from the thread's wake-up (an async watcher). That
wake-up has been seen lost in a test process, twice: every greenlet waiting on the
pool waited for ever, though the pool had finished its tasks (SQLite's, and another
time a name lookup: gevent's own thread resolver warns of "hangs" in long-lived
programs). So ``run`` waits for the hub's wake-up, and also looks, every
``LOST_WAKEUP_CHECK`` seconds, whether the thread has finished, and goes on if so: a
worker's recorder or its calls must not stop for good on a lost wake-up.

The outcome comes back as a value (``_Outcome``): an error is raised in the caller,
never printed by the hub as a failed pool task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent import monkey

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often a wait for a pool thread looks whether the thread has finished without
# waking the loop, in seconds.
LOST_WAKEUP_CHECK = 5.0

_native_ident = monkey.get_original("_thread", "get_ident")
_MAIN_IDENT = _native_ident()  # the thread that imported this: a worker's, the tests'


def available() -> bool:
    """True on the patched process's own thread, where a pool thread can take work."""
    return monkey.is_module_patched("threading") and _native_ident() == _MAIN_IDENT


def run(
    work: Callable[..., T], args: tuple, what: str, cancel: Callable[[], Any] | None = None
) -> T:
    """``work(*args)`` in a pool thread; this greenlet waits for its outcome.

    ``what`` names the work in the warning of a lost wake-up. If the wait is
    interrupted (a ``Timeout``, a kill), ``cancel()``, when given, is called and the
    thread waited for before the exception goes on (SQLite's connection must not be
    used while the thread does); without it the thread finishes on its own, unheard.
    """
    outcome = _Outcome()
    result = gevent.get_hub().threadpool.spawn(outcome.run, work, args)
    try:
        outcome.wait(result, what)
    except BaseException:
        if cancel is not None and not outcome.done:
            cancel()
            outcome.wait(result, what)
        raise
    return outcome.value()


def run_to_end(work: Callable[..., T], args: tuple, what: str) -> T:
    """``work(*args)`` in a pool thread where one can take it (else here); waited for to
    its end even if the wait is interrupted, as a file's write and sync must be: the
    caller closes the file, or lets another greenlet at it, once this returns or raises."""
    if not available():
        return work(*args)
    return run(work, args, what, cancel=_let_it_end)


def _let_it_end() -> None:
    """Nothing stops a write or a sync midway: ``run`` waits for the thread."""


class _Outcome:
    """What ``work`` did in its pool thread, kept where the loop can look at it."""

    __slots__ = ("_error", "_value", "done")

    def __init__(self) -> None:
        self.done = False
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self, work: Callable[..., Any], args: tuple) -> None:
        """In the pool thread: ``work(*args)``, its result or its error kept here."""
        try:
            self._value = work(*args)
        except BaseException as exc:
            self._error = exc
        finally:
            self.done = True

    def wait(self, result: Any, what: str) -> None:
        """Until the thread has finished ``run``: woken by the hub, or by a look."""
        while not result.ready():
            result.wait(LOST_WAKEUP_CHECK)
            if self.done and not result.ready():
                log.warning("%s ended without waking the loop; going on without it", what)
                return

    def value(self) -> Any:
        """``work``'s result, or its error raised."""
        if self._error is not None:
            raise self._error
        return self._value
