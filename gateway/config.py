"""Defaults for every knob, what each may be, and where the project lives.

``create_app`` loads these, then ``GATEWAY_*`` environment variables (with the prefix
removed: ``GATEWAY_DRAIN_TIMEOUT=60`` sets ``DRAIN_TIMEOUT``; values are parsed as
JSON where they can be), then ``DATABASE_URL``, ``REDIS_URL``, ``ADMIN_SUPER_SECRET``
and ``COMMIT_SHA`` (as text), then the mapping a test passes; ``problems`` then says
what is wrong with any of them, before anything starts. gunicorn.conf.py reads this file as a
file (it imports nothing of the gateway), so it imports only the standard library.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTANCE = Path(os.environ.get("GATEWAY_INSTANCE_PATH", ROOT / "instance"))


def default_database_url() -> str:
    """The embedded default: an SQLite file in the instance folder."""
    return f"sqlite:///{INSTANCE / 'gateway.db'}"


DEFAULTS: dict[str, object] = {
    "DATABASE_URL": None,  # None: default_database_url()
    "REDIS_URL": None,  # None: limits live in process memory
    "ADMIN_SUPER_SECRET": None,  # None: generated once and kept in the settings table
    "INIT_FILE": None,  # a YAML or JSON file of providers, models and keys applied at start
    # The commit this gateway runs, for GET /api/admin/rev (COMMIT_SHA, as NexusGate).
    "COMMIT_SHA": "unknown",
    # Origins whose browser apps may call /v1 and /api (cors.py): "*" (NexusGate's
    # default), a comma-separated list, or empty for none. ALLOWED_ORIGINS, as NexusGate.
    "ALLOWED_ORIGINS": "*",
    # -- Traffic control and metrics (limiter.py, ratelimit.py, metrics.py) --
    # Redis (REDIS_URL) is away when a command takes longer than REDIS_TIMEOUT:
    # limits then fail open, and Redis is tried again REDIS_RETRY_AFTER seconds later.
    "REDIS_TIMEOUT": 0.05,
    "REDIS_CONNECT_TIMEOUT": 0.2,
    "REDIS_RETRY_AFTER": 1.0,
    "REDIS_PREFIX": "gw",  # of every Redis key and channel: several gateways, one Redis
    # Without REDIS_URL, the socket of the store process the workers of this instance
    # share their limits through (instancestore.py): gunicorn's master starts one
    # (storekeeper.py) and sets this when it runs more than one worker. "off": none,
    # each worker keeps its own limits (a process and a round trip less, limits per
    # worker).
    "INSTANCE_STORE": None,
    # Seconds an operation of the instance store may take before it counts as away (its
    # REDIS_TIMEOUT). Longer than Redis's: the store shares the instance's cores with its
    # workers, and on a loaded 2-core machine it was not run for 50 ms at times (26
    # fail-opens in 30 s with no fault at 0.05 s, its round trips' tail near 56 ms). A
    # dead store is seen at once (the connection's end, a refused connect): only a hung
    # one (SIGSTOP) makes a call wait this long, once; then limits fail open for
    # REDIS_RETRY_AFTER.
    "INSTANCE_STORE_TIMEOUT": 0.25,
    # With Redis, a worker takes this share of a key's RPM limit ahead, in leases, so
    # that most calls admit with no round trip (leases.py); 0: every call asks Redis.
    "LIMIT_LEASE_SHARE": 0.01,
    # A call's concurrency slot and request-id claim live this long unless refreshed
    # (every third of it), so a killed worker's are freed within it.
    "INFLIGHT_TTL": 30.0,
    # A finished call's answer is kept this long in its request-id claim (Redis, or the
    # worker's memory) for repeats; older ones are read from the database.
    "DEDUP_TTL": 600.0,
    "LOGIN_ATTEMPTS": 10,  # wrong secrets per client address (sign-in, admin bearer) ...
    "LOGIN_WINDOW": 60.0,  # ... per this many seconds, refilled continuously
    # Proxies whose X-Forwarded-For is believed (addresses or CIDRs, comma-separated):
    # the client address that sign-in throttling counts. None: the peer is the client.
    "TRUSTED_PROXIES": None,
    "METRICS_TOKEN": None,  # set: GET /metrics requires Authorization: Bearer <token>
    # Fernet keys for provider API keys at rest, comma-separated, newest first (vault.py).
    # None: one generated into instance/encryption.key (every instance needs the same).
    "ENCRYPTION_KEYS": None,
    # Client disconnects mid-stream: "drain" reads the upstream to its end and records
    # the whole answer; "cancel" closes the upstream at once (saves provider cost).
    "ON_DISCONNECT": "drain",
    "DRAIN_TIMEOUT": 300.0,  # seconds a drain may run after the client left
    "MAX_DRAINS": 200,  # concurrent drains per worker; past it, cancel
    "CALL_TIMEOUT": 900.0,  # hard bound on one upstream call, drains included
    "CONNECT_TIMEOUT": 10.0,
    "READ_TIMEOUT": 120.0,  # longest silence from an upstream before it counts as stalled
    "CLIENT_WRITE_TIMEOUT": 60.0,  # a client that stops reading is dropped after this
    "HEARTBEAT_INTERVAL": 15.0,  # SSE comment to keep idle client connections open
    "UPSTREAM_POOL_SIZE": 200,  # pooled connections per upstream host, per worker
    "COUNT_TOKENS_TIMEOUT": 10.0,  # a provider's count_tokens answer; past it, estimate
    "TRIES_PER_PROVIDER": 2,
    "BACKOFF_MIN": 0.1,
    "BACKOFF_MAX": 5.0,
    "MAX_BODY_BYTES": 32 * 1024 * 1024,
    # Numbers of embedding vectors kept per record (whole vectors, in input order);
    # the default keeps 5 vectors of 3,072 dimensions, about 330 KB of JSON. 0: none.
    "EMBEDDING_RECORD_VALUES": 16384,
    # Each worker holds every live key and the model catalog in memory and re-reads what
    # changed this often (0: read through on every call, for tests). Revocations made in
    # another worker or instance apply within this time.
    "CACHE_TTL": 5.0,
    # Longest a call with a key (or model) this worker does not know yet waits for the
    # database to confirm it: one made a moment ago in another worker. Never waited for
    # while the database is known to be down.
    "KEY_LOOKUP_WAIT": 1.0,
    "SNAPSHOT_FILE": None,  # None: instance/snapshot.json (last known keys and catalog)
    "DB_CONNECT_TIMEOUT": 3.0,  # seconds to open a PostgreSQL connection
    "DB_TIMEOUT": 10.0,  # longest a background database job may take before it counts as down
    # Longest one statement of a request (admin API, dashboard, /api/usage) may wait for
    # PostgreSQL before the request answers 503: a server that stopped answering.
    "DB_REQUEST_TIMEOUT": 30.0,
    "RECORDER_WRITERS": None,  # None: 1 on SQLite, 4 on PostgreSQL
    "RECORDER_BATCH": 100,
    "RECORDER_INTERVAL": 0.05,  # seconds a final snapshot waits to share its write with others
    "RECORDER_LINGER": 0.25,  # seconds a pending snapshot waits: a call over by then is written once
    "RECORDER_AHEAD": True,  # each snapshot to a local file first: a kill -9 loses no record
    "JOURNAL_DIR": None,  # None: instance/journal
    "JOURNAL_REPLAY_INTERVAL": 5.0,  # seconds between looks for journaled records to write back
    # Crash recovery: every process writes a heartbeat row this often; a process finalises
    # another's pending rows once it has watched that heartbeat stand still this long.
    "PROCESS_HEARTBEAT": 10.0,
    "PROCESS_DEAD_AFTER": 45.0,
    "SWEEP_INTERVAL": 10.0,  # seconds between looks for dead processes' rows (0: never)
    # Rows written before heartbeats existed (no owner): pending this long means orphaned.
    "SWEEP_AFTER": None,  # None: CALL_TIMEOUT + 120
    # After a FIN on a stream, a probe is written and the connection looked at this often:
    # a gone client resets; one that has not after 5 intervals (longer than any client's
    # round trip) is only half-closed and keeps its stream.
    "PROBE_INTERVAL": 0.1,
    # -- Search, server logs (records.py, srvlog.py) --
    # A listing's total counts this many matching rows exactly; past it, PostgreSQL's
    # planner estimates (counting a million rows takes longer than the page).
    "SEARCH_COUNT_CAP": 1000,
    # The gateway's own records at this level and above go to srv_logs ("OFF": none),
    # written every SRV_LOG_INTERVAL s; at most SRV_LOG_QUEUE wait (more are counted and
    # dropped); one message is kept SRV_LOG_BURST times per SRV_LOG_WINDOW s, then counted.
    "SRV_LOG_LEVEL": "WARNING",
    "SRV_LOG_INTERVAL": 1.0,
    "SRV_LOG_QUEUE": 1000,
    "SRV_LOG_BURST": 5,
    "SRV_LOG_WINDOW": 10.0,
    # -- Retention (retention.py, partitions.py) --
    # Records (completions, embeddings) and server logs older than RETENTION_DAYS are
    # deleted; records older than RETENTION_BODY_DAYS keep their numbers but lose their
    # prompt and answer. None: kept for ever. One instance at a time prunes, every
    # RETENTION_INTERVAL s, RETENTION_BATCH rows per statement, pausing RETENTION_PAUSE s
    # between statements. The SQLite lock file: None, beside the database file.
    "RETENTION_DAYS": None,
    "RETENTION_BODY_DAYS": None,
    "RETENTION_INTERVAL": 3600.0,
    "RETENTION_BATCH": 500,
    "RETENTION_PAUSE": 0.05,
    "RETENTION_LOCK_FILE": None,
    "LOG_LEVEL": "INFO",
    # The server, read by gunicorn.conf.py (PORT and HOST without the GATEWAY_ prefix).
    "PORT": 8080,
    "HOST": "0.0.0.0",
    "WORKERS": 2,
    "WORKER_CONNECTIONS": 2000,
    "GRACEFUL_TIMEOUT": 30,  # seconds in-flight calls and drains get after SIGTERM
    "WORKER_TIMEOUT": 30,  # gunicorn's heartbeat watchdog
    "MAX_REQUESTS": 0,  # recycle a worker after this many requests; 0: never
    "ACCESS_LOG": "-",  # "-": stdout; empty: none
    # Bytes of log lines each process (workers, gunicorn's master) keeps for a stdout or
    # stderr whose reader fell behind (a pipe or socket: logstreams.py); past them,
    # lines are dropped and counted.
    "LOG_BACKLOG": 1048576,
    # OpenTelemetry: every finished call as an OTLP span (README "OpenTelemetry"); the
    # standard OTEL_* variables configure the exporter. None: on when an OTLP endpoint is
    # configured; true/false force it. Content needs OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT.
    "OTEL_EXPORT": None,
    "OTEL_DEFAULT_SERVICE_NAME": "llm-gateway",  # unless OTEL_SERVICE_NAME names one
    "OTEL_CONTENT_MAX_CHARS": 8192,  # per message part, when content is captured; 0: no cut
}


# -- What each knob may be ------------------------------------------------------------
#
# A wrong value stops the start with one line naming the variable (``problems``), where
# it used to stop it with a traceback from deep inside a worker's boot, or not at all:
# some knobs are read only when a call or a page needs them, which then failed.


def _number(value: object) -> float | None:
    """``value`` as a finite number, or None (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return number if math.isfinite(number) else None


def _seconds(least: float, above: bool = False) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        n = _number(value)
        if n is None or n < least or (above and n == least):
            return f"a number of seconds {'above' if above else 'at least'} {least:g}"
        return None

    return check


def _count(least: int, most: int | None = None) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        n = _number(value)
        if n is None or not n.is_integer() or n < least or (most is not None and n > most):
            return f"a whole number from {least}" + (f" to {most}" if most is not None else "")
        return None

    return check


def _share(most: float) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        n = _number(value)
        if n is None or not 0 <= n <= most:
            return f"a share from 0 to {most:g}"
        return None

    return check


def _optional(check: Callable[[object], str | None]) -> Callable[[object], str | None]:
    def optional(value: object) -> str | None:
        if value is None or value == "":
            return None
        reason = check(value)
        return reason and f"{reason}, or empty"

    return optional


def _one_of(*choices: str) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if isinstance(value, str) and value.upper() in choices:
            return None
        return "one of " + ", ".join(c.lower() for c in choices)

    return check


def _switch(value: object) -> str | None:
    if value is None or (value in (0, 1) and not isinstance(value, float)):
        return None
    if isinstance(value, str) and value.strip().lower() in _SWITCH_WORDS:
        return None
    return "true or false, or empty (on when an OTLP endpoint is configured)"


_SWITCH_WORDS = ("", "true", "false", "1", "0", "yes", "no", "on", "off")


def _on_off(value: object) -> str | None:
    if value in (0, 1) and not isinstance(value, float):  # true and false among them
        return None
    return "true or false"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The knobs with a rule; the others are text (URLs, paths, names, secrets), checked
# where they are used.
RULES: dict[str, Callable[[object], str | None]] = {
    "REDIS_TIMEOUT": _seconds(0, above=True),
    "REDIS_CONNECT_TIMEOUT": _seconds(0, above=True),
    "REDIS_RETRY_AFTER": _seconds(0),
    "INSTANCE_STORE_TIMEOUT": _seconds(0, above=True),
    "LIMIT_LEASE_SHARE": _share(0.1),  # a worker holds two leases: 20% of a limit at most
    "INFLIGHT_TTL": _seconds(0, above=True),
    "DEDUP_TTL": _seconds(0),
    "LOGIN_ATTEMPTS": _count(1),
    "LOGIN_WINDOW": _seconds(0, above=True),
    "ON_DISCONNECT": _one_of("DRAIN", "CANCEL"),
    "DRAIN_TIMEOUT": _seconds(0),
    "MAX_DRAINS": _count(0),
    "CALL_TIMEOUT": _seconds(0, above=True),
    "CONNECT_TIMEOUT": _seconds(0, above=True),
    "READ_TIMEOUT": _seconds(0, above=True),
    "CLIENT_WRITE_TIMEOUT": _seconds(0, above=True),
    "HEARTBEAT_INTERVAL": _seconds(0, above=True),
    "UPSTREAM_POOL_SIZE": _count(1),
    "COUNT_TOKENS_TIMEOUT": _seconds(0, above=True),
    "TRIES_PER_PROVIDER": _count(1),
    "BACKOFF_MIN": _seconds(0),
    "BACKOFF_MAX": _seconds(0),
    "MAX_BODY_BYTES": _count(1),
    "EMBEDDING_RECORD_VALUES": _count(0),
    "CACHE_TTL": _seconds(0),
    "KEY_LOOKUP_WAIT": _seconds(0),
    "DB_CONNECT_TIMEOUT": _seconds(0, above=True),
    "DB_TIMEOUT": _seconds(0, above=True),
    "DB_REQUEST_TIMEOUT": _seconds(0, above=True),
    "RECORDER_WRITERS": _optional(_count(0)),
    "RECORDER_BATCH": _count(1),
    "RECORDER_INTERVAL": _seconds(0),
    "RECORDER_LINGER": _seconds(0),
    "RECORDER_AHEAD": _on_off,
    "JOURNAL_REPLAY_INTERVAL": _seconds(0, above=True),
    "PROCESS_HEARTBEAT": _seconds(0),  # 0: no heartbeat (a test app)
    "PROCESS_DEAD_AFTER": _seconds(0, above=True),
    "SWEEP_INTERVAL": _seconds(0),
    "SWEEP_AFTER": _optional(_seconds(0, above=True)),
    "PROBE_INTERVAL": _seconds(0, above=True),
    "SEARCH_COUNT_CAP": _count(0),
    "SRV_LOG_LEVEL": _one_of(*LOG_LEVELS, "OFF", ""),
    "SRV_LOG_INTERVAL": _seconds(0, above=True),
    "SRV_LOG_QUEUE": _count(1),
    "SRV_LOG_BURST": _count(1),
    "SRV_LOG_WINDOW": _seconds(0, above=True),
    "RETENTION_DAYS": _optional(_seconds(0)),
    "RETENTION_BODY_DAYS": _optional(_seconds(0)),
    "RETENTION_INTERVAL": _seconds(0),
    "RETENTION_BATCH": _count(1),
    "RETENTION_PAUSE": _seconds(0),
    "LOG_LEVEL": _one_of(*LOG_LEVELS),
    "PORT": _count(0, 65535),
    "WORKERS": _count(1),
    "WORKER_CONNECTIONS": _count(1),
    "GRACEFUL_TIMEOUT": _count(0),
    "WORKER_TIMEOUT": _count(0),
    "MAX_REQUESTS": _count(0),
    "LOG_BACKLOG": _count(0),
    "OTEL_EXPORT": _switch,
    "OTEL_CONTENT_MAX_CHARS": _count(0),
}
# Read by gunicorn.conf.py without the GATEWAY_ prefix.
UNPREFIXED = ("PORT", "HOST")


def problems(values: Mapping[str, object]) -> list[str]:
    """One line for each knob in ``values`` that is not what it may be, naming its
    environment variable and saying what it may be; [] when all are fine."""
    found = []
    for name, check in RULES.items():
        if name not in values or (reason := check(values[name])) is None:
            continue
        variable = name if name in UNPREFIXED else f"GATEWAY_{name}"
        found.append(f"{variable}={_shown(values[name])} is wrong: it must be {reason}")
    return found


def from_environment(environ: Mapping[str, str]) -> dict[str, object]:
    """The knobs ``environ`` sets, parsed as ``create_app`` parses them (JSON where they
    can be), for a process that builds no app (gunicorn's master)."""
    values: dict[str, object] = {}
    for name in DEFAULTS:
        variable = name if name in UNPREFIXED else f"GATEWAY_{name}"
        if variable in environ:
            try:
                values[name] = json.loads(environ[variable])
            except ValueError:
                values[name] = environ[variable]
    return values


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return repr(text[:60] + ("..." if len(text) > 60 else ""))
