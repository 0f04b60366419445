"""A process's write-ahead files: each record snapshot on local disk before its answer goes.

They lie in the journal's directory (``ahead-<n>-<pid>.jsonl``): each snapshot goes
there as it is recorded, before the call's answer goes, so a process killed with its
records still in memory (``kill -9``, the OOM killer) leaves them on disk (the page
cache outlives the process; no fsync, which would cost milliseconds a call). Its owner
deletes what the database has taken; a dead owner's files are replayed like its
journal (``Journal.replay(write, "ahead")``), never a live one's.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from gateway import jsoncodec

log = logging.getLogger(__name__)


class Ahead:
    """This process's write-ahead files: a record snapshot on disk before its answer goes.

    ``append`` writes one line to the current file; past ``SEGMENT`` bytes (``full``)
    ``rotate`` starts the next one, keeping the old until ``taken`` says the database (or
    the journal) has every call that was still unwritten when it rotated. With nothing
    unwritten (``clear``), the old files go and the current one is cut back once past
    ``TRIM`` bytes. A new file never replaces one that is there (a process before this
    one, under the same pid, may have left it for a replay). A line the disk refuses (full,
    read-only) makes the file ``full``: the next record tries a new one (a warning until
    one takes a line again); meanwhile the records are in memory only, as before.
    """

    SEGMENT = 4 * 1024 * 1024
    TRIM = 256 * 1024

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._number = 0
        self._size = 0
        self._path: Path | None = None
        self._kept: list[tuple[Path, set[str]]] = []  # rotated files, calls still unwritten
        self._failed = False  # the current file refused a line (or could not be made)
        self._said = False  # that warning was logged since a line was last taken

    def append(self, row: dict) -> None:
        """Write ``row`` at the end of the current file (no fsync)."""
        if self._fd is None:
            if self._failed:
                return
            self._open()
            if self._fd is None:
                return
        line = jsoncodec.encode(row, default=str) + b"\n"
        try:
            written = os.write(self._fd, line)
            if written != len(line):  # a full disk took part of it: a torn line, set aside
                raise OSError(f"wrote {written} of {len(line)} bytes")
        except OSError as exc:
            self._fail(exc)
            return
        self._size += written
        self._said = False

    @property
    def full(self) -> bool:
        """Time for the next file: this one is big, or refused a line."""
        return self._failed or self._size >= self.SEGMENT

    def rotate(self, unwritten: set[str]) -> None:
        """Start the next file; keep this one until ``unwritten`` calls are taken."""
        if self._fd is not None:
            os.close(self._fd)
        if self._path is not None:
            self._kept.append((self._path, unwritten))
        self._fd, self._path, self._size, self._failed = None, None, 0, False

    def taken(self, uids: set[str]) -> None:
        """These calls' latest snapshots are in the database or the journal."""
        for path, waiting in list(self._kept):
            waiting -= uids
            if not waiting:
                self._kept.remove((path, waiting))
                with contextlib.suppress(OSError):
                    path.unlink()

    def clear(self) -> None:
        """Nothing is unwritten: no line is needed any more. The current file is cut
        back only past ``TRIM`` bytes: a cut and the next append's new block cost more
        than the lines kept (a replay of lines already written changes nothing)."""
        for path, _ in self._kept:
            with contextlib.suppress(OSError):
                path.unlink()
        self._kept = []
        if self._fd is not None and self._size >= self.TRIM:
            try:
                os.ftruncate(self._fd, 0)
            except OSError as exc:
                self._fail(exc)
                return
            self._size = 0

    def close(self, remove: bool) -> None:
        """At exit: delete every file (``remove``: all is written or journaled), or leave
        them for a survivor to replay."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove:
            for path in [*(p for p, _ in self._kept), self._path]:
                if path is not None:
                    with contextlib.suppress(OSError):
                        path.unlink()
            self._kept = []

    def _open(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            while True:
                self._number += 1
                path = self.directory / f"ahead-{self._number}-{os.getpid()}.jsonl"
                try:
                    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                    self._fd = os.open(path, flags, 0o600)
                    break
                except FileExistsError:
                    continue
        except OSError as exc:
            self._fail(exc)
            return
        self._path, self._size = path, 0

    def _fail(self, exc: OSError) -> None:
        if not self._said:
            log.warning("journal: the write-ahead file failed (%s); records in memory only", exc)
            self._said = True
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._failed = None, True  # its path stays: ``rotate`` keeps it
