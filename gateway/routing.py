"""Which upstreams may serve a model, in what order, and the failover loop.

The catalog of live providers and models is small and read on every call, so each
worker keeps it in memory, reloaded in the background every ``CACHE_TTL`` seconds
(``snapshot.py``) and kept while the database is away; admin writes in this worker
reload it at once, and a model it does not know yet waits briefly for one reload (it
may have been added a moment ago in another worker). Candidates of a system name are put in weighted
random order (Efraimidis-Spirakis: every candidate takes part, whatever their
number); ``failover`` then tries each one ``TRIES_PER_PROVIDER`` times with
exponential backoff and jitter, moving on for connection errors, timeouts, 429 and
5xx, and stopping at any other 4xx.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC
from typing import TypeVar

from gateway.errors import NotFound, UpstreamFailed, UpstreamRejected, UpstreamTimeout
from gateway.failures import UpstreamError

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One model row of a system name, with its provider's connection facts."""

    model_id: int
    system_name: str
    remote_id: str
    model_type: str
    weight: float
    provider_id: int
    provider_name: str
    provider_type: str
    base_url: str
    api_key: str | None
    api_version: str | None
    stream_usage: bool
    # USD per million tokens, as the catalog knew them when the call was routed.
    input_price: float | None = None
    output_price: float | None = None
    cache_read_price: float | None = None
    cache_write_price: float | None = None
    created: int = 0  # when the model row was made, Unix seconds (``/v1/models``)


class Catalog:
    """System name -> candidates, held per worker as last loaded."""

    def __init__(self, load: Callable[[], list[Candidate]], ttl: float = 0.0) -> None:
        self._load = load
        self.ttl = ttl  # without a background refresher: reload after this long
        self.background = False  # True once a refresher keeps it fresh
        # Make the catalog reflect the database as of a time (monotonic); False if it
        # cannot. The refresher replaces it; alone, the catalog reloads inline.
        self.confirm: Callable[[float], bool] = self.read_through
        self._entries: dict[tuple[str, str], list[Candidate]] = {}
        self._rows: list[Candidate] = []
        self._loaded_at = float("-inf")  # when the last load from the database started
        self._invalidated = float("-inf")

    def invalidate(self) -> None:
        """Mark the catalog out of date; the next lookup reloads it."""
        self._invalidated = time.monotonic()  # a load in flight may predate the change

    def lookup(
        self, model: str, model_type: str = "chat", provider: str | None = None
    ) -> list[Candidate]:
        """Candidates for ``model`` (``name`` or ``name@provider``); NotFound if none."""
        asked = time.monotonic()
        confirmed = self._out_of_date(asked) and self.confirm(asked)
        try:
            return self._find(model, model_type, provider)
        except NotFound:
            if confirmed:
                raise
            # Added a moment ago elsewhere? Read, or (the database away) take what another
            # worker read later.
            self.confirm(asked)
            return self._find(model, model_type, provider)

    def _find(self, model: str, model_type: str, provider: str | None) -> list[Candidate]:
        name = model
        if (model_type, model) not in self._entries and "@" in model:
            name, _, suffix = model.rpartition("@")
            provider = provider or suffix
        candidates = self._entries.get((model_type, name), [])
        if provider:
            candidates = [c for c in candidates if c.provider_name == provider]
            if not candidates:
                raise NotFound(f"Model '{name}' not found on provider '{provider}'")
        if not candidates:
            raise NotFound(f"Model '{model}' not found")
        return candidates

    def system_names(self) -> list[Candidate]:
        """The first model row (by id) of every live system name, by type and name."""
        asked = time.monotonic()
        if self._out_of_date(asked):
            self.confirm(asked)
        return [cs[0] for _, cs in sorted(self._entries.items())]

    def counts(self) -> tuple[int, dict[str, int]]:
        """Providers serving a live model, and live models by type, for /metrics."""
        from gateway.models import MODEL_TYPES  # after gevent patched threading (see db.py)

        asked = time.monotonic()
        if self._out_of_date(asked):
            self.confirm(asked)
        rows = self._rows
        models = {kind: sum(c.model_type == kind for c in rows) for kind in MODEL_TYPES}
        return len({c.provider_id for c in rows}), models

    def refresh(self) -> bool:
        """Reload every candidate from the database; True if anything changed."""
        started = time.monotonic()
        rows = self._load()
        self._loaded_at = started
        if rows == self._rows:
            return False
        self._use(rows)
        return True

    def dump(self) -> list[dict]:
        """The catalog as JSON-able rows, for the snapshot file."""
        return [asdict(c) for c in self._rows]

    def load(self, rows: list[dict]) -> None:
        """Replace the catalog with rows from ``dump``."""
        self._use([Candidate(**row) for row in rows])

    def _use(self, rows: list[Candidate]) -> None:
        entries: dict[tuple[str, str], list[Candidate]] = {}
        for candidate in rows:
            entries.setdefault((candidate.model_type, candidate.system_name), []).append(candidate)
        self._rows, self._entries = rows, entries

    def _out_of_date(self, now: float) -> bool:
        if self._invalidated >= self._loaded_at:
            return True
        return not self.background and now - self._loaded_at > self.ttl

    def read_through(self, _asked: float = 0.0) -> bool:
        """Reload now, in this greenlet; False (keeping the last state) if that fails."""
        try:
            self.refresh()
        except Exception:  # the database is away: keep serving what we have
            log.exception("routing: cannot reload the model catalog")
            return False
        return True


def weighted_order(
    candidates: list[Candidate], rng: random.Random | None = None
) -> list[Candidate]:
    """Weighted random permutation; weight 0 sorts last (used only if all else fails)."""
    rng = rng or random

    def key(c: Candidate) -> float:
        if c.weight <= 0:
            return -1.0 - rng.random()
        return rng.random() ** (1.0 / c.weight)

    return sorted(candidates, key=key, reverse=True)


def backoff(attempt: int, low: float, high: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before try number ``attempt`` (0-based): 0 for the first."""
    if attempt == 0:
        return 0.0
    delay = min(low * 2 ** (attempt - 1), high)
    return delay + delay * 0.1 * (rng or random).random()


def failover(
    candidates: list[Candidate],
    try_one: Callable[[Candidate], T],
    *,
    tries_per_provider: int,
    backoff_range: tuple[float, float],
    sleep: Callable[[float], object],
    on_failure: Callable[[Candidate, UpstreamError], None],
) -> tuple[Candidate, T]:
    """Try candidates in order until one answers; raise the right GatewayError if none."""
    attempt = 0
    last: UpstreamError | None = None
    for candidate in candidates:
        for _ in range(tries_per_provider):
            if attempt:  # the first try goes at once: no yield to the hub before it
                sleep(backoff(attempt, *backoff_range))
            attempt += 1
            try:
                return candidate, try_one(candidate)
            except UpstreamError as exc:
                on_failure(candidate, exc)
                last = exc
                if exc.kind == "http" and not exc.retriable:
                    raise UpstreamRejected(
                        exc.status or 502, exc.content, exc.content_type
                    ) from exc
                if not exc.retriable:
                    raise UpstreamFailed(f"Upstream call failed: {exc.describe()}") from exc
    if last is not None and last.kind == "timeout":
        raise UpstreamTimeout(
            f"All upstream providers failed ({attempt} attempts); last: {last.describe()}"
        )
    raise UpstreamFailed(
        f"All upstream providers failed ({attempt} attempts); last: {last.describe() if last else 'none'}"
    )


def load_candidates() -> list[Candidate]:
    """Every live model row with its provider, from the database."""
    from gateway.db import connection  # after gevent patched threading (see db.py)
    from gateway.models import Model

    with connection():  # the refresher's own, when it runs in the background
        rows = list(Model.active().order_by(Model.id))
    return [
        Candidate(
            model_id=m.id,
            system_name=m.system_name,
            remote_id=m.remote_id or m.system_name,
            model_type=m.model_type,
            weight=m.weight,
            provider_id=m.provider.id,
            provider_name=m.provider.name,
            provider_type=m.provider.type,
            base_url=m.provider.base_url,
            api_key=m.provider.api_key,
            api_version=m.provider.api_version,
            stream_usage=m.provider.stream_usage,
            input_price=m.input_price,
            output_price=m.output_price,
            cache_read_price=m.cache_read_price,
            cache_write_price=m.cache_write_price,
            created=int(m.created_at.replace(tzinfo=UTC).timestamp()),
        )
        for m in rows
    ]


catalog = Catalog(load_candidates)
