"""Where the snapshot file is replaced, among the processes of a host (``snapshot``).

``replace`` runs in a pool thread (``offloop.run_to_end``): the write and its sync take
as long as the disk does, and an ``flock`` may wait for another process. The file is
written aside (``.snapshot.json.<pid>``, 0600) and synced, then, under the instance's
writers' ``flock`` (``.snapshot.json.lock``), renamed into place, unless the file in
place holds a later read (its ``read_at``, in its first bytes): a worker held up
mid-write, by a busy disk or a stop, took every other back to its older read. Over
a later read it only takes out the keys the writer knows were revoked since: a
revocation's write must get the key out of the file, whatever its own read's age.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from gateway.models import utcnow


def replace(path: Path, body: str, read_at: datetime | None, revoked: frozenset[str]) -> None:
    """Make ``body``, of a read started at ``read_at``, the content of ``path``, readable
    by this user only, unless the file in place holds a later read: then take the keys
    of ``revoked`` out of that one. Written aside and synced, then renamed, so readers
    see the old file or the new, never half. In a pool thread (``offloop.run_to_end``);
    a failed write leaves nothing aside."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_synced(tmp, body)
        # Synced before the lock: a busy disk holds up no other process's write.
        with _locked(path):
            if _newer(_head_read_at(path), read_at):
                # A worker read later and wrote it: its file serves, but not with a key
                # revoked after that read (this worker heard it; that one may not yet).
                try:
                    later = _without(path, revoked)
                except (ValueError, KeyError, TypeError):
                    later = body  # unreadable whole: ours serves, and holds no such key
                if later is None:
                    tmp.unlink()
                    with contextlib.suppress(OSError):  # as if ours: one put there by hand
                        os.chmod(path, 0o600)
                    return
                if later is not body:  # (ours is aside already)
                    _write_synced(tmp, later)
            os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()  # half a copy of provider keys, taking room on a full disk
        raise


def _without(path: Path, revoked: frozenset[str]) -> str | None:
    """The file at ``path`` without the keys of ``revoked``; None if it holds none."""
    if not revoked:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = [row for row in data["keys"] if row[0] not in revoked]
    if len(rows) == len(data["keys"]):
        return None
    return json.dumps({**data, "written_at": utcnow().isoformat(), "keys": rows})


def _write_synced(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fd, 0o600)  # it holds provider keys, whatever the umask or old file
        fh.write(text)
        fh.flush()
        os.fsync(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """The instance's writers' exclusive ``flock`` beside ``path``, for a look and a
    rename: taken in a pool thread only (it waits for another process's in the
    kernel), and inside this process's turn (``Refresher._writing``). A file system
    without ``flock`` takes the write unlocked, as before the lock."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):  # it holds nothing; made by hand, say
            os.fchmod(fd, 0o600)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # lets the lock go


# How the file starts (``Refresher._write``): when its read started, in its first
# bytes, so a write looks at the file in place without reading every key in it.
_HEAD = re.compile(r'\{"written_at": "[^"]*", "read_at": (?:null|"([^"]+)")')


def _head_read_at(path: Path) -> datetime | None:
    """When the read the file at ``path`` holds started; None if there is none, or it
    does not say (an earlier build's, or one put there by hand)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(256).decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    found = _HEAD.match(head)
    try:
        return datetime.fromisoformat(found[1]) if found and found[1] else None
    except ValueError:
        return None


def _newer(in_place: datetime | None, ours: datetime | None) -> bool:
    """Whether the file in place holds a later read than ours. One of unknown age is
    older than any (``recall`` takes nothing from it); a read of unknown age, ours
    (from such a file), is older than any known."""
    if in_place is None:
        return False
    return ours is None or in_place > ours
