"""Prometheus metrics for ``GET /metrics``, merged over every gunicorn worker of an instance.

Names and labels are NexusGate's, so its Grafana dashboard and alert rules work
unchanged; keys are labelled ``api_key_comment`` as there (the key's comment, "unknown"
without one) plus ``api_key_id`` (unique: two keys may share a comment). Never the key.
NexusGate recomputes its counters from the database at each scrape; ours count from the
process start, as Prometheus counters do (``rate``/``increase`` read them alike).
The catalog gauges (usable keys, providers, models) are counted at each scrape from the
keys and catalog the worker holds in memory for calls, so a scrape works while the
database is down. Ours are ``gateway_*``: calls and drains in flight, how aborted calls
ended, journal depth, records held in memory and lost, limiter fail-opens, recorder
write latency, log lines dropped. The values' files are allocated as they grow
(``metric_files``), so a full disk costs a value, never the process.

Across workers: gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh directory
before any worker imports prometheus_client; each worker writes its values there,
``render()`` merges them, and gunicorn's ``child_exit`` removes a dead worker's live
gauge files so its in-flight gauges drop out. Without that variable (tests, the CLI) the
metrics are this process's alone.
"""

from __future__ import annotations

import atexit
import hmac
import logging
import os
import time
import tomllib
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

from gevent import get_hub, monkey
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from gateway.config import ROOT
from gateway.exchange import EMBEDDING, Exchange
from gateway.metric_files import AllocatedMmapedDict

log = logging.getLogger(__name__)

# NexusGate's: the text format 0.0.4. prometheus_client's latest says 1.0.0, whose one
# change (names beyond the legacy characters) no name here uses: the same text either
# way, and a Prometheus before 3.0 knows only 0.0.4.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # NexusGate's, in seconds
KEY = ("api_key_id", "api_key_comment")

_registry = CollectorRegistry()

# prometheus_client's multiprocess values ask the system for the pid at every change, to
# notice a fork: a system call each, and a call makes about 13 changes. Here the pid is
# asked once, and again in a forked child: what that check is for.
_pid = os.getpid()


def _forked() -> None:
    """In a forked child: its own pid, and none of its parent's changes or calls."""
    global _pid, _in_flight, _drains
    _pid = os.getpid()
    _added.clear()
    _levels.clear()
    _observed.clear()
    _in_flight = _drains = 0


os.register_at_fork(after_in_child=_forked)

FAILURE_LOG_EVERY = 60.0  # seconds: a full disk fails every change, logged once a minute
_failure_logged = -FAILURE_LOG_EVERY


def _failed() -> None:
    """Log (now and then) the failure being handled: a value its file could not take."""
    global _failure_logged
    now = time.monotonic()
    if now - _failure_logged >= FAILURE_LOG_EVERY:
        _failure_logged = now
        log.exception("metrics: could not write a value (repeats are not logged for a minute)")


if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # before any metric below takes its value class
    # Every change takes the values' one lock; gevent's (what threading.Lock is in a
    # patched worker) costs about 1 µs in Python each time, the OS's 0.1 µs. Nothing
    # between taking and releasing it can switch greenlets (arithmetic and a write into
    # an mmap), so no greenlet ever waits on it, and threads are kept apart as before.
    values.Lock = monkey.get_original("_thread", "allocate_lock")
    # Files allocated as they grow: a full disk under them fails a change, not the process.
    values.MmapedDict = AllocatedMmapedDict
    _shared = values.MultiProcessValue(lambda: _pid)

    def _value(*args: Any, **kwargs: Any) -> Any:
        """A value in this process's file; where the file cannot be made or grown (a
        full disk), this process's alone: it is missing from scrapes, and nothing else."""
        try:
            return _shared(*args, **kwargs)
        except OSError:
            _failed()
            return values.MutexValue(*args, **kwargs)

    values.ValueClass = _value


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(name, doc, labels, registry=_registry)


def _gauge(name: str, doc: str, mode: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, doc, labels, registry=_registry, multiprocess_mode=mode)


def _histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
    return Histogram(name, doc, ("model",), registry=_registry, buckets=buckets)


# NexusGate's (prometheus_client adds the _total suffix to counters).
COMPLETIONS = _counter(
    "nexusgate_completions", "Completion requests", ("model", "status", "api_format", *KEY)
)
EMBEDDINGS = _counter("nexusgate_embeddings", "Embedding requests", ("model", "status", *KEY))
TOKENS = {
    kind: _counter(f"nexusgate_tokens_{kind}", f"{kind.capitalize()} tokens", ("model",))
    for kind in ("prompt", "completion", "embedding")
}
COST = {
    kind: _counter(f"nexusgate_cost_{kind}_usd", f"Cost of {kind} tokens in USD", ("model",))
    for kind in ("prompt", "completion", "total")
}
COMPLETION_SECONDS = _histogram("nexusgate_completion_duration_seconds", "Completion duration")
TTFT_SECONDS = _histogram("nexusgate_completion_ttft_seconds", "Time to first token")
EMBEDDING_SECONDS = _histogram("nexusgate_embedding_duration_seconds", "Embedding duration")
REJECTIONS = _counter(
    "nexusgate_rate_limit_rejections",
    "Calls refused by a limit (429, or 402 for a spent budget)",
    (*KEY, "limit_type"),
)
KEY_LIMITS = {
    (kind, what): _gauge(
        f"nexusgate_api_key_{kind}_{what}", f"{kind.upper()} {what} per key", "mostrecent", KEY
    )
    for kind in ("rpm", "tpm")
    for what in ("usage", "limit")
}
ACTIVE_KEYS = _gauge("nexusgate_active_api_keys", "Usable API keys", "mostrecent")
ACTIVE_PROVIDERS = _gauge("nexusgate_active_providers", "Providers", "mostrecent")
ACTIVE_MODELS = _gauge("nexusgate_active_models", "Models by type", "mostrecent", ("type",))
INFO = _gauge("nexusgate_info", "Build information", "max", ("version",))

# Ours.
CALLS_IN_FLIGHT = _gauge("gateway_calls_in_flight", "Calls in flight", "livesum")
DRAINS_IN_FLIGHT = _gauge(
    "gateway_drains_in_flight", "Upstreams read on after their client left", "livesum"
)
ABORTED = _counter(
    "gateway_aborted_calls", "Calls whose client left, by how they ended", ("ending",)
)
JOURNAL_DEPTH = _gauge(
    "gateway_journal_depth", "Records in the journal waiting for the database", "livesum"
)
RECORDS_HELD = _gauge(
    "gateway_records_held",
    "Records kept in memory because neither the database nor the journal took them",
    "livesum",
)
RECORDS_LOST = _counter(
    "gateway_records_lost", "Records no database, journal or memory could keep (logged)"
)
RECORDS_REFUSED = _counter(
    "gateway_records_refused",
    "Records the database refused for what they hold, set aside for replay-refused",
)
FAIL_OPENS = _counter(
    "gateway_limiter_fail_open", "Limiter decisions allowed because Redis was away", ("operation",)
)
LOG_LINES_DROPPED = _counter(
    "gateway_log_lines_dropped",
    "Log lines to stdout or stderr dropped because their reader fell behind (logstreams)",
    ("stream",),
)
RECORDER_WRITE_SECONDS = Histogram(
    "gateway_recorder_write_seconds",
    "One batch write of call records",
    registry=_registry,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def _key_labels(key_id: int, comment: str | None) -> tuple[str, str]:
    return str(key_id), (comment or "unknown")[:100]


# Each metric's child per label values, as ``labels()`` returns it: looked up here in one
# dict, without ``labels()``'s checks, conversions and lock on every call (issue 11).
_children: dict[tuple, Any] = {}

# A call's own changes (``call_finished``, ``key_usage``, the in-flight gauges: a dozen
# per call, each a write into a shared mmap, about 50 µs of a call's latency at one
# client when written on its path) are kept here and written by ``flush``, a timer of
# the event loop's that the first change after a flush starts: at most ``FLUSH_EVERY``
# later, it writes what every call of that time changed, added up (a counter once, a
# gauge's latest value, a histogram's sum once and each bucket it gained once). Written
# at the end of each loop turn instead, they cost a busy worker about 5% of a JSON
# call's CPU (issue 11: its turns hold one or two calls each). ``render`` and the
# process's exit flush first, so a scrape of this worker sees every change; another
# worker's, at most ``FLUSH_EVERY`` late. Changed from the worker's greenlets only; the
# rest (rarer, or read from a dead worker's files) is written at once.
FLUSH_EVERY = 0.02  # seconds
_added: dict[Any, float] = {}
_levels: dict[Any, float] = {}
_observed: dict[Any, list[float]] = {}  # a histogram's child -> its observations
_flushing = False
_in_flight = 0  # this process's calls in flight (CALLS_IN_FLIGHT, written as a level)
_drains = 0  # and drains (DRAINS_IN_FLIGHT)


def _add(child: Any, amount: float = 1.0) -> None:
    _added[child] = _added.get(child, 0.0) + amount
    _later()


def _level(child: Any, value: float) -> None:
    _levels[child] = value
    _later()


def _observe(child: Any, value: float) -> None:
    held = _observed.get(child)
    if held is None:
        _observed[child] = [value]
    else:
        held.append(value)
    _later()


def _later() -> None:
    global _flushing
    if not _flushing:
        _flushing = True
        # Not keeping the loop alive: a process's exit flushes (atexit) what is left.
        get_hub().loop.timer(FLUSH_EVERY, ref=False).start(flush)


def flush() -> None:
    """Write the changes waiting for the timer (each once, whatever fails)."""
    global _flushing
    _flushing = False
    writes = [(child.inc, amount) for child, amount in _added.items()]
    writes += [(child.set, value) for child, value in _levels.items()]
    for child, observations in _observed.items():
        writes += _histogram_writes(child, observations)
    _added.clear()
    _levels.clear()
    _observed.clear()
    for write, value in writes:
        try:
            write(value)
        except Exception:  # a metric must never cost a call, nor the others their changes
            _failed()


atexit.register(flush)


def _histogram_writes(child: Any, observations: list[float]) -> list[tuple[Any, float]]:
    """What ``child.observe`` of each observation writes, added up: the sum once, and
    each bucket once with its count (prometheus_client keeps a histogram's buckets apart,
    not cumulative: an observation counts in the first bucket whose bound holds it)."""
    bounds = child._upper_bounds
    counts: dict[int, int] = {}
    for value in observations:
        i = bisect_left(bounds, value)
        if i < len(bounds) and value <= bounds[i]:  # what observe asks (a NaN: no bucket)
            counts[i] = counts.get(i, 0) + 1
    writes = [(child._sum.inc, sum(observations))]
    writes += [(child._buckets[i].inc, count) for i, count in counts.items()]
    return writes


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered."""
    child = _children.get((metric, labels))
    if child is None:
        child = _children[metric, labels] = metric.labels(*labels)
    return child


def call_finished(exchange: Exchange, key_comment: str | None = None) -> None:
    """Count a call whose record is final: status, tokens, cost, duration, TTFT.

    The cost is the record's own (``exchange.cost``, fixed when the call finished): the
    prompt's share is its uncached, cache-read and cache-write input, the completion's its
    output (reasoning included).
    """
    model = exchange.model
    key = _key_labels(exchange.api_key_id, key_comment)
    answered = exchange.status in ("completed", "aborted")  # the upstream answered in full
    if exchange.kind == EMBEDDING:
        _add(_child(EMBEDDINGS, model, exchange.status, *key))
        if exchange.input_tokens:
            _add(_child(TOKENS["embedding"], model), exchange.input_tokens)
        if answered and exchange.duration_ms is not None:
            _observe(_child(EMBEDDING_SECONDS, model), exchange.duration_ms / 1000)
        return
    _add(_child(COMPLETIONS, model, exchange.status, exchange.api_format, *key))
    if exchange.input_tokens:
        _add(_child(TOKENS["prompt"], model), exchange.input_tokens)
    if exchange.output_tokens:
        _add(_child(TOKENS["completion"], model), exchange.output_tokens)
    cost = exchange.cost
    if cost:
        prompt = cost["input"] + cost["cacheRead"] + cost["cacheWrite"]
        for kind, usd in (("prompt", prompt), ("completion", cost["output"])):
            if usd:
                _add(_child(COST[kind], model), usd)
        if cost["total"]:
            _add(_child(COST["total"], model), cost["total"])
    if answered and exchange.duration_ms is not None:
        _observe(_child(COMPLETION_SECONDS, model), exchange.duration_ms / 1000)
    if answered and exchange.ttft_ms is not None:
        _observe(_child(TTFT_SECONDS, model), exchange.ttft_ms / 1000)


def calls_swept(rows: Iterable[dict], key_comments: Mapping[int, str | None]) -> None:
    """Count the calls the sweeper finalised (``failed``: their process died before
    their end, which is what counts the others): rows as ``finalise_orphan_rows`` says."""
    for row in rows:
        key = _key_labels(row["api_key"], key_comments.get(row["api_key"]))
        if row["kind"] == EMBEDDING:
            _add(_child(EMBEDDINGS, row["model"], row["status"], *key))
        else:
            _add(_child(COMPLETIONS, row["model"], row["status"], row["api_format"], *key))


def rejected(key_id: int, key_comment: str | None, limit_type: str) -> None:
    """Count a call refused by a limit: ``rpm``, ``tpm``, ``model``, ``concurrency``, ``budget``."""
    REJECTIONS.labels(*_key_labels(key_id, key_comment), limit_type).inc()


# The limit each key's limit gauge was last set to by this process. A limit is the same
# in every process ("mostrecent" then shows any of them), and changes only when an
# admin changes it: each call wrote it again, two of a call's writes into the mmap.
_limits_set: dict[Any, float] = {}


def key_usage(key_id: int, key_comment: str | None, usage: dict[str, dict[str, int]]) -> None:
    """Set a key's RPM/TPM use and limits (``Limiter.usage``'s answer); a limit only when
    it is not what this process set it to last."""
    key = _key_labels(key_id, key_comment)
    for kind in ("rpm", "tpm"):
        _level(_child(KEY_LIMITS[kind, "usage"], *key), usage[kind]["current"])
        limit = _child(KEY_LIMITS[kind, "limit"], *key)
        if _limits_set.get(limit) != usage[kind]["limit"]:
            _limits_set[limit] = usage[kind]["limit"]
            _level(limit, usage[kind]["limit"])


def catalog(api_keys: int, providers: int, models: dict[str, int]) -> None:
    """Set the counts of usable keys, providers and models (``{"chat": n, "embedding": n}``)."""
    ACTIVE_KEYS.set(api_keys)
    ACTIVE_PROVIDERS.set(providers)
    for kind, count in models.items():
        ACTIVE_MODELS.labels(kind).set(count)


def call_opened() -> None:
    """A call started (its upstream is being contacted)."""
    global _in_flight
    _in_flight += 1
    _level(CALLS_IN_FLIGHT, _in_flight)


def call_closed() -> None:
    """A call's record is final."""
    global _in_flight
    _in_flight -= 1
    _level(CALLS_IN_FLIGHT, _in_flight)


def drain_started() -> None:
    """A client left and its upstream is read on."""
    global _drains
    _drains += 1
    _level(DRAINS_IN_FLIGHT, _drains)


def drain_ended() -> None:
    """A drain is over (read to its end, cut at its bound, or stopped)."""
    global _drains
    _drains -= 1
    _level(DRAINS_IN_FLIGHT, _drains)


def aborted(ending: str) -> None:
    """Count a call whose client left: ``drained``, ``cancelled``, ``timed_out``..."""
    ABORTED.labels(ending).inc()


def journal_depth(records: int) -> None:
    """Set how many of this worker's records wait in the journal."""
    JOURNAL_DEPTH.set(records)


def records_held(records: int) -> None:
    """Set how many of this worker's calls wait in memory for a database or a disk."""
    RECORDS_HELD.set(records)


def records_lost(records: int) -> None:
    """Count records that could not be kept anywhere."""
    RECORDS_LOST.inc(records)


def records_refused(records: int) -> None:
    """Count records the database refused, set aside for an operator (``replay-refused``)."""
    RECORDS_REFUSED.inc(records)


def recorder_wrote(seconds: float) -> None:
    """Observe one batch write of the recorder."""
    RECORDER_WRITE_SECONDS.observe(seconds)


def limiter_failed_open(operation: str) -> None:
    """Count a limiter decision allowed because Redis was away."""
    FAIL_OPENS.labels(operation).inc()


def limiter_operations(operations: Iterable[str]) -> None:
    """Export the fail-open count of each of the limiter's ``operations`` from the
    start, at 0: a series that first appears with its value has no sample before it,
    and Prometheus's increase() and rate() count none of what it first shows (an
    instance's first Redis outage went unseen by an alert on them)."""
    for operation in operations:
        FAIL_OPENS.labels(operation)


def log_lines_dropped(stream: str, lines: int) -> None:
    """Count log lines to ``stream`` dropped because its reader fell behind."""
    _add(_child(LOG_LINES_DROPPED, stream), lines)


def authorized(authorization: str | None, token: str | None) -> bool:
    """True when no METRICS_TOKEN is set, or the Authorization header bears it."""
    if not token:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


def render() -> bytes:
    """The Prometheus text exposition of every worker of this instance (or this process)."""
    flush()
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return generate_latest(_registry)
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=path)
    return generate_latest(merged)


def _version() -> str:
    try:
        with open(ROOT / "pyproject.toml", "rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


INFO.labels(_version()).set(1)
