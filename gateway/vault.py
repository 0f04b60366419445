"""Provider API keys encrypted at rest; the files that hold secrets kept private.

The keys: ``GATEWAY_ENCRYPTION_KEYS``, one or more Fernet keys (``Fernet.generate_key()``,
or ``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``)
separated by commas, newest first. The first encrypts; every one decrypts. To rotate,
put a new key in front and run ``flask --app wsgi rotate-keys``: every provider key is
then encrypted with the new one, and the old key can go.

Without it, ``make run`` still works with no setup: a key is generated once into
``instance/encryption.key`` (mode 0600) and used from there. Every instance sharing a
database needs the same key, so production sets ``GATEWAY_ENCRYPTION_KEYS``. An
SQLite database file is created readable by its owner only.

A stored key reads ``fernet:<token>``; one without the prefix is plain text written
before encryption existed: it is read as it is, and encrypted by the rotation. A key
that no configured key can decrypt reads as None (and says so in the log), so one bad
row costs that provider its key, not the whole catalog.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from flask import Flask

from gateway.db import database, is_postgres

log = logging.getLogger(__name__)

PREFIX = "fernet:"
KEY_FILE = "encryption.key"


class Vault:
    """Seals and opens secrets with the configured keys; one per process."""

    def __init__(self) -> None:
        self._fernet: MultiFernet | None = None
        self.source = ""  # where the keys came from, for the start banner
        self.generated = False  # True when this process wrote a new key file
        self._unreadable: set[str] = set()  # reported once each, not on every catalog load

    def init_app(self, app: Flask) -> None:
        """Load the keys from ENCRYPTION_KEYS, else from (or into) the instance's key file."""
        configured = app.config.get("ENCRYPTION_KEYS")
        if isinstance(configured, str):
            configured = [k for k in (part.strip() for part in configured.split(",")) if k]
        if configured:
            keys, self.source = list(configured), "GATEWAY_ENCRYPTION_KEYS"
        else:
            path = Path(app.instance_path) / KEY_FILE
            if not path.exists():
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.generated = private_file(path, Fernet.generate_key() + b"\n")
            keys, self.source = [path.read_bytes().strip()], str(path)
        try:
            self._fernet = MultiFernet([Fernet(key) for key in keys])
        except (ValueError, TypeError) as exc:
            raise RuntimeError(
                f"encryption keys from {self.source} are not Fernet keys "
                "(32 url-safe base64-encoded bytes each)"
            ) from exc
        sqlite = None if is_postgres() else getattr(database.obj, "database", None)
        if sqlite and sqlite != ":memory:":
            # The SQLite file holds key hashes and every prompt: its owner's only. (The
            # -wal and -shm files SQLite makes beside it take the same mode.)
            private_file(Path(sqlite))

    def seal(self, secret: str) -> str:
        """``secret`` encrypted with the newest key, as it is stored."""
        return PREFIX + self._keys().encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str | None:
        """The secret a stored value holds (plain text passes); None if no key opens it."""
        if not stored.startswith(PREFIX):
            return stored  # written before encryption: the rotation will seal it
        try:
            return self._keys().decrypt(stored[len(PREFIX) :].encode()).decode()
        except InvalidToken:
            if stored not in self._unreadable:
                self._unreadable.add(stored)
                log.error("vault: a stored provider key cannot be decrypted with %s", self.source)
            return None

    def _keys(self) -> MultiFernet:
        if self._fernet is None:
            raise RuntimeError("vault: init_app has not run")
        return self._fernet


def private_file(path: Path, content: bytes = b"") -> bool:
    """Create ``path`` readable by its owner only, unless it exists; True if created."""
    # Written aside and linked into place: two processes starting at once cannot both
    # create it, and nobody reads a half-written key.
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(aside, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(aside)


vault = Vault()
