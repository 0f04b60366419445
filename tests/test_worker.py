"""The worker: when a stopping one stops its calls and journals, and what it freezes at load."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway import worker


@pytest.mark.parametrize("graceful_timeout", [0, 1, 2, 4, 6, 9, 30, 300])
def test_a_stopping_worker_journals_what_is_unwritten_before_the_arbiters_kill(
    graceful_timeout: int,
) -> None:
    """Calls still running are stopped first, then the records the database has not
    taken are journaled, with time left to do it before the SIGKILL at graceful_timeout.
    The time to journal was once counted from a full 3 s margin even where the calls had
    a third of the timeout: at 4 s, 1.2 s after the kill."""
    stop_calls, journal = worker.deadlines(100.0, graceful_timeout)
    killed_at = 100.0 + graceful_timeout
    assert 100.0 <= stop_calls <= journal <= killed_at
    assert stop_calls >= killed_at - worker.FINALISE_MARGIN
    if graceful_timeout:  # time to write the stopped calls' records, then to journal
        assert stop_calls < journal < killed_at


def test_what_the_app_holds_at_load_is_frozen_and_its_garbage_collected() -> None:
    """After loading the app, a worker freezes what is alive (no full collection walks
    it again), having collected the garbage first: garbage frozen would never be freed."""
    import gc
    import weakref

    from gateway.worker import GatewayWorker

    class Cycle:
        pass

    garbage = Cycle()
    garbage.me = garbage  # type: ignore[attr-defined]
    gone = weakref.ref(garbage)
    del garbage
    app = object()
    worker = GatewayWorker.__new__(GatewayWorker)
    worker.app = SimpleNamespace(wsgi=lambda: app)  # type: ignore[assignment]
    try:
        worker.load_wsgi()
        assert worker.wsgi is app
        assert gone() is None
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
