"""A tiny WSGI app and gunicorn hooks that drive ``gateway.telemetry`` in a gevent worker.

``gunicorn -k gevent -c python:tests.telemetry_app tests.telemetry_app:app``
(without ``-c`` the hooks do not run: telemetry starts on the first request and only
its ``atexit`` flush runs at exit). ``POST /export`` hands a JSON list of rows to ``telemetry.export`` (as the recorder will
after a commit), ``GET /state`` tells how the batch processor's worker runs, and the
``worker_exit`` hook flushes the spans as the gateway's must. Gunicorn's master imports
this module before the worker patches threading, so the gateway is imported only
inside the functions.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any


def post_worker_init(worker: Any) -> None:
    """After gevent patched the worker: start exporting, as create_app will."""
    from gateway.telemetry import telemetry

    telemetry.configure(None)
    telemetry.start()


def worker_exit(server: Any, worker: Any) -> None:
    """The flush the gateway's gunicorn.conf.py runs after the recorder's drain."""
    from gateway.telemetry import telemetry

    flushed = telemetry.shutdown(timeout=float(os.environ.get("TEST_FLUSH_TIMEOUT", "5")))
    worker.log.info("telemetry flushed: %s", flushed)


def app(environ: dict, start_response: Any) -> list[bytes]:
    from gateway.telemetry import telemetry

    if telemetry._tracer is None:  # started without post_worker_init: start on first use
        post_worker_init(None)
    if environ["REQUEST_METHOD"] == "POST" and environ["PATH_INFO"] == "/export":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        telemetry.export(json.loads(body))
        answer: dict[str, Any] = {"emitted": telemetry.emitted, "errors": telemetry.errors}
    else:
        answer = _state(telemetry)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(answer).encode()]


def _state(telemetry: Any) -> dict[str, Any]:
    """Whether the batch processor's worker "thread" is really a greenlet of this process."""
    import threading

    import greenlet
    from gevent import monkey

    worker = telemetry._processor._batch_processor._worker_thread
    greenlets = {id(g) for g in gc.get_objects() if isinstance(g, greenlet.greenlet)}
    return {
        "enabled": telemetry.enabled,
        "threading_patched": monkey.is_module_patched("threading"),
        "worker_alive": worker.is_alive(),
        "worker_is_greenlet": worker.ident in greenlets,
        "native_thread_ids": [t.native_id for t in threading.enumerate()],
    }
