"""Who is calling: gateway keys for /v1, the admin secret for /api/admin.

A key comes as ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (current
Anthropic SDKs send Bearer). Keys are looked up by their SHA-256 hash and cached
per worker for ``CACHE_TTL`` seconds, so a call costs no database round trip; a
revocation reaches every worker within that time.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from flask import Flask

from gateway.db import connection
from gateway.errors import AuthenticationFailed
from gateway.models import ApiKey, Setting, utcnow


@dataclass(frozen=True, slots=True)
class Caller:
    """The facts about a key that a call needs."""

    id: int
    rpm_limit: int
    tpm_limit: int
    revoked: bool
    expires_at: datetime | None
    budget_usd: float | None = None  # per calendar month (UTC)

    def usable(self, now: datetime) -> bool:
        return not self.revoked and (self.expires_at is None or self.expires_at > now)


class KeyCache:
    """Key hash -> Caller (or None for unknown keys), for ``ttl`` seconds."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Caller | None]] = {}

    def get(self, key: str) -> Caller | None:
        digest = ApiKey.hash(key)
        hit = self._entries.get(digest)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        with connection():
            row = ApiKey.get_or_none(ApiKey.key_hash == digest)
        caller = (
            None
            if row is None
            else Caller(
                row.id, row.rpm_limit, row.tpm_limit, row.revoked, row.expires_at, row.budget_usd
            )
        )
        if len(self._entries) > 10_000:  # bad keys must not grow this without bound
            self._entries.clear()
        self._entries[digest] = (now, caller)
        return caller

    def forget(self, key_hash: str) -> None:
        """Drop one cached key (by hash): a change to it applies at once in this worker."""
        self._entries.pop(key_hash, None)


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
