"""Per-model limits (``/api/admin/ratelimits``): the buckets a call's model adds to its key's.

A limit names an ``identifier`` and gives each key a bucket of ``limit`` calls refilled
at ``refill`` per second, decided in the same atomic step as the key's RPM and TPM. A
call is limited by the identifier equal to the model string it sent (``gpt-4o@openai``)
and by the one equal to its system name (``gpt-4o``), both when both exist, so pinning a
provider never escapes a model's limit; ``default``, when configured, limits every model
that has no limit of its own. Nothing is limited unless configured (NexusGate applies a
hidden 10-call, 1-per-second default to every model).

The limits live in the database (every instance applies them) and in each worker's
memory: a call never reads the database for them. A change made in this worker applies
at once, other workers and instances hear of it from the limiter (Redis pub/sub) or
reload within ``CACHE_TTL``; reloads run in the background and a failed one keeps the
limits last read.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import gevent.pool

from gateway.buckets import Bucket
from gateway.db import connection
from gateway.limiter import model_bucket
from gateway.models import RateLimit

log = logging.getLogger(__name__)

DEFAULT = "default"
CHANGED = "model-limits"  # announced on the key-change channel: not a key hash


class ModelLimits:
    """The configured per-model limits, held in memory and reloaded in the background."""

    def __init__(self) -> None:
        self.ttl = 5.0
        self._limits: dict[str, tuple[int, float]] = {}
        self._loaded_at = -math.inf
        self._again = False
        self._group = gevent.pool.Group()

    def init_app(self, app: Any) -> None:
        """Reload at most every CACHE_TTL, and when a change is announced (``changed``)."""
        self.ttl = float(app.config["CACHE_TTL"])
        self._limits, self._loaded_at = {}, -math.inf

    def buckets(self, model: str) -> list[Bucket]:
        """The per-model buckets a call naming ``model`` takes from (none unless configured)."""
        if time.monotonic() - self._loaded_at > self.ttl:
            self.reload_soon()
        limits = self._limits
        names = [model]
        if "@" in model:
            names.append(model.rpartition("@")[0])  # the system name, as routing reads it
        found = [name for name in dict.fromkeys(names) if name in limits]
        if not found and DEFAULT in limits:
            found = [DEFAULT]
        return [model_bucket(name, *limits[name]) for name in found]

    def reload(self) -> None:
        """Read every limit now."""
        started = time.monotonic()
        with connection():
            rows = list(RateLimit.select())
        self._limits = {r.identifier: (r.limit, r.refill) for r in rows}
        self._loaded_at = started

    def reload_soon(self) -> None:
        """Reload in the background; a failure keeps the last limits."""
        self._again = True  # a reload already running may have read before the change
        self._loaded_at = time.monotonic()  # no retry storm while the database is away
        if len(self._group) == 0:
            greenlet = self._group.spawn(self._reload_while_asked)
            greenlet.link_exception(
                lambda g: log.error("model limits: reload died", exc_info=g.exc_info)
            )

    def wait(self, timeout: float) -> bool:
        """Wait for a reload in the background to end; True if none is left running."""
        return self._group.join(timeout=timeout)

    def changed(self, message: str | None) -> None:
        """A limiter announcement: reload if it was about these limits (None: maybe)."""
        if message is None or message == CHANGED:
            self.reload_soon()

    def _reload_while_asked(self) -> None:
        while self._again:
            self._again = False
            try:
                self.reload()
            except Exception as exc:  # the database is away: keep what we have
                log.warning("model limits: cannot reload (%s); keeping the last ones", exc)
                return


model_limits = ModelLimits()
