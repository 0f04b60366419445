"""Who is calling: gateway keys for /v1, the admin secret for /api/admin.

A key comes as ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (current
Anthropic SDKs send Bearer). Each worker holds every live key in memory, by its
SHA-256 hash (``KeyCache``), loaded at start and re-read in the background
(``snapshot.py``): a call never waits on the database for a key the worker knows,
and keeps working while the database is away. A key the worker does not know yet
(made a moment ago elsewhere) waits, briefly and never during an outage, for one
fresh read. Changes made in another worker apply within ``CACHE_TTL``, or at once when
they are announced (``changed``, through the limiter's Redis channel); ``forget`` applies
one at once in this worker. A key forgotten because it changed is served as it was
until a read succeeds (the database may have gone away just after the change); a key
forgotten because it was revoked is refused at once, database or not. While the
database is away, a key this worker never read but another did (the snapshot file) is
served as that one read it (``recall``).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import Flask

from gateway.db import connection
from gateway.errors import AuthenticationFailed
from gateway.models import ApiKey, Setting, utcnow

log = logging.getLogger(__name__)

# Re-read keys changed this long before the newest change seen: a change committed
# late, or stamped by a host whose clock is a little behind, is still picked up.
OVERLAP = timedelta(seconds=60)
# Announced before a revoked key's hash (``changed``): refuse it at once. A previous
# version forgets this as if it were a hash (it is none), then the hash that follows.
REVOKED = "revoked:"


@dataclass(frozen=True, slots=True)
class Caller:
    """The facts about a key that a call needs."""

    id: int
    rpm_limit: int
    tpm_limit: int
    revoked: bool
    expires_at: datetime | None
    budget_usd: float | None = None  # per calendar month (UTC)
    max_concurrent: int | None = None  # calls in flight at once; None: unlimited
    comment: str | None = None  # for the metrics' api_key_comment label

    @classmethod
    def of(cls, row: ApiKey) -> Caller:
        """The Caller of a key row."""
        return cls(
            row.id,
            row.rpm_limit,
            row.tpm_limit,
            row.revoked,
            row.expires_at,
            row.budget_usd,
            row.max_concurrent,
            row.comment,
        )

    def usable(self, now: datetime) -> bool:
        return not self.revoked and (self.expires_at is None or self.expires_at > now)


class KeyCache:
    """Key hash -> Caller for every live key, as last read from the database."""

    def __init__(self) -> None:
        self.ttl = 0.0  # without a background refresher: re-read after this long
        self.background = False  # True once a refresher keeps the cache fresh
        # Make the cache reflect the database as of a time (monotonic); False if it
        # cannot. The refresher replaces it; alone, the cache reads inline.
        self.confirm: Callable[[float], bool] = self.read_through
        # Before a key is looked up: apply the changes other workers have already sent
        # (``limiter.catch_up``, with Redis).
        self.catch_up: Callable[[], None] = lambda: None
        self._callers: dict[str, Caller] = {}
        self._since: datetime | None = None  # the newest updated_at read
        self._read_at = float("-inf")
        self._misses: dict[str, float] = {}  # hash -> when it was last found unknown
        self._forgotten: dict[str, float] = {}  # hash -> when forget() was called
        # hash -> a changed key as it was (or a recalled one), until a read succeeds
        self._stale: dict[str, Caller] = {}
        self._revoked: dict[str, float] = {}  # hash -> when it was forgotten as revoked
        # A key was revoked: what this worker knows must replace the snapshot file at
        # once, or a worker started during an outage would serve the key from it.
        self.on_revoked: Callable[[], None] = lambda: None
        # Changes may have been missed: the keys must be read again now (the refresher
        # is kicked), not at its next round, CACHE_TTL away.
        self.on_forgot_all: Callable[[], None] = lambda: None
        self._unbudgeted: set[int] | None = None  # ids of the known keys without a budget

    def get(self, key: str) -> Caller | None:
        """The key's Caller as last known; None if it is unknown or revoked."""
        self.catch_up()
        digest = ApiKey.hash(key)
        now = time.monotonic()
        caller = self._callers.get(digest)
        if caller is not None and (self.background or now - self._read_at <= self.ttl):
            return caller
        missed = self._misses.get(digest)
        if caller is None and missed is not None and now - missed < self.ttl:
            return None  # looked for a moment ago: bad keys cost one read per CACHE_TTL
        confirmed = self.confirm(now)
        caller = self._callers.get(digest)
        if caller is None and not confirmed and digest in self._stale:
            # Changed a moment ago and the database is away: as it was, not refused.
            return self._stale[digest]
        if caller is None:
            if len(self._misses) > 10_000:  # bad keys must not grow this without bound
                self._misses.clear()
            self._misses[digest] = now
        return caller

    def without_budget(self, key_id: int) -> bool:
        """Whether the key is known to have no monthly budget: its spend is read by
        nobody (one not known, or changed and not read since, may have one)."""
        if self._unbudgeted is None:  # made again after every read and change
            self._unbudgeted = {c.id for c in self._callers.values() if c.budget_usd is None}
        return key_id in self._unbudgeted

    def count_usable(self) -> int:
        """How many known keys are usable now, for /metrics (kept fresh: no database read)."""
        asked = time.monotonic()
        if not self.background and asked - self._read_at > self.ttl:
            self.confirm(asked)
        now = utcnow()
        return sum(caller.usable(now) for caller in self._callers.values())

    def forget(self, key_hash: str, revoked: bool = False) -> None:
        """Drop one key (by hash): its next use re-reads it, so a change applies at once.

        Until a read succeeds the key is served as it was, unless it was ``revoked``
        (or deleted): then it is refused from now on, whether the database answers or not.
        """
        caller = self._callers.pop(key_hash, None)
        self._unbudgeted = None
        self._misses.pop(key_hash, None)
        self._forgotten[key_hash] = time.monotonic()
        if revoked:
            self._stale.pop(key_hash, None)
            self._revoked[key_hash] = self._forgotten[key_hash]
            self.on_revoked()
        elif caller is not None:
            self._stale[key_hash] = caller

    def refresh(self, full: bool = False) -> bool:
        """Read the keys changed since the last read (all if ``full``); True if any did."""
        started = time.monotonic()
        since = None if full or self._since is None else self._since - OVERLAP
        rows = list(ApiKey.changed_since(since))
        if since is None:
            self._since = None  # the newest of what this read finds
            self._misses.clear()
        # No switch from here on: requests never see a half-applied read.
        callers = {} if since is None else self._callers
        changed = False
        for row in rows:
            if self._since is None or row.updated_at > self._since:
                self._since = row.updated_at
            if self._forgotten.get(row.key_hash, float("-inf")) > started:
                continue  # changed while we read: the next read has its new state
            if row.revoked:
                changed |= callers.pop(row.key_hash, None) is not None
                continue
            caller = Caller.of(row)
            if callers.get(row.key_hash) != caller:
                callers[row.key_hash] = caller
                changed = True
        if since is None:
            changed = callers != self._callers
            self._callers = callers
        self._read_at = started
        self._unbudgeted = None
        self._forgotten = {h: t for h, t in self._forgotten.items() if t > started}
        self._revoked = {h: t for h, t in self._revoked.items() if t > started}
        self._stale = {h: c for h, c in self._stale.items() if h in self._forgotten}
        return changed

    def dump(self) -> list[list]:
        """The cache as JSON-able rows, for the snapshot file (a key changed and not read
        since as it was: a worker started from the file serves it, as this one does)."""
        known = {**self._stale, **self._callers}
        return [
            [
                h,
                c.id,
                c.rpm_limit,
                c.tpm_limit,
                c.expires_at and c.expires_at.isoformat(),
                c.budget_usd,
                c.max_concurrent,
                c.comment,
            ]
            for h, c in sorted(known.items())
        ]

    def revoked(self) -> frozenset[str]:
        """The hashes of the keys announced revoked since the last read started (a read
        that started later has them revoked)."""
        return frozenset(self._revoked)

    def load(self, rows: list[list]) -> None:
        """Replace the cache with rows from ``dump``; the next refresh reads every key."""
        self._callers = dict(_loaded(row) for row in rows)
        self._unbudgeted = None
        self._since = None

    def recall(self, rows: list[list]) -> int:
        """Serve the keys of rows from ``dump`` this worker does not know, read by another
        worker after this one's last read, until a read succeeds (the database is away:
        a key made a moment before, which only the other worker was asked for). Not one
        revoked since that read: it was announced here. How many."""
        recalled = 0
        for row in rows:
            digest, caller = _loaded(row)
            if digest in self._callers or digest in self._stale or digest in self._revoked:
                continue
            self._stale[digest] = caller
            self._misses.pop(digest, None)
            recalled += 1
        return recalled

    def read_through(self, _asked: float = 0.0) -> bool:
        """Reload now, in this greenlet; False (keeping the last state) if that fails."""
        try:
            with connection():
                self.refresh()
        except Exception:  # the database is away: keep serving what we have
            log.exception("auth: cannot read the keys")
            return False
        return True

    def forget_all(self) -> None:
        """Changes may have been missed (the limiter lost Redis): read every key again.

        The keys stay usable meanwhile; the next read, asked for now (``on_forgot_all``),
        is a full one, which drops every key revoked since. Left to the refresher's next
        round (CACHE_TTL), a key revoked while the store restarted was served that long
        by every worker that missed its announcement.
        """
        self._since = None
        self._read_at = float("-inf")
        self.on_forgot_all()

    def changed(self, message: str | None) -> None:
        """A key changed somewhere (``limiter.on_key_change``): its hash, or ``REVOKED``
        and its hash; None: any may have."""
        if message is None:
            self.forget_all()
        elif message.startswith(REVOKED):
            self.forget(message.removeprefix(REVOKED), revoked=True)
        else:
            self.forget(message)


def _loaded(row: list) -> tuple[str, Caller]:
    """A row of ``KeyCache.dump``: the key's hash and Caller (older files lack the later
    fields)."""
    digest, key_id, rpm, tpm, expires_at, *rest = row
    expires = datetime.fromisoformat(expires_at) if expires_at else None
    return digest, Caller(key_id, rpm, tpm, False, expires, *rest)


keys = KeyCache()


def presented_key(headers: object) -> str | None:
    """The credential in ``Authorization: Bearer`` or ``x-api-key``, if any."""
    auth = headers.get("Authorization", "")  # type: ignore[attr-defined]
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    value = headers.get("x-api-key", "")  # type: ignore[attr-defined]
    return value.strip() or None


def authenticate(headers: object) -> Caller:
    """The calling key, or AuthenticationFailed."""
    key = presented_key(headers)
    if not key:
        raise AuthenticationFailed("Missing API key: send Authorization: Bearer <key> or x-api-key")
    caller = keys.get(key)
    if caller is None or not caller.usable(utcnow()):
        raise AuthenticationFailed("Invalid API key")
    return caller


def is_admin(headers: object, secret: str) -> bool:
    """True when the request carries the admin secret."""
    key = presented_key(headers)
    return bool(key) and hmac.compare_digest(key.encode(), secret.encode())


GENERATED_SECRET = "ADMIN_SUPER_SECRET_GENERATED"


def admin_secret(app: Flask) -> str:
    """ADMIN_SUPER_SECRET, or the one generated on first start (kept in settings)."""
    configured = app.config.get("ADMIN_SUPER_SECRET")
    if configured:
        return configured
    cached = app.extensions.get("gateway.admin_secret")
    if cached is None:
        cached = ensure_generated_secret()
        app.extensions["gateway.admin_secret"] = cached
    return cached


def ensure_generated_secret() -> str:
    """Read the generated admin secret, creating it if this is the first start."""
    value = Setting.read(GENERATED_SECRET)
    if not value:
        Setting.insert(
            key=GENERATED_SECRET, value=secrets.token_urlsafe(24)
        ).on_conflict_ignore().execute()
        value = Setting.read(GENERATED_SECRET)  # another process may have won the race
    return str(value)
