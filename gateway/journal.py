"""Records the database could not take yet, kept durably on local disk (SPEC rule 8).

File I/O only, no database: ``append`` writes rows to this process's
``journal-<pid>.jsonl`` and fsyncs, beside the loop except at exit (``offloop``: a busy
disk's sync takes up to hundreds of ms, which every call of the worker waited for on
the loop); ``replay`` hands whole files to a writer, in lots: this
process's own, and those left by processes that have died. A file is claimed by an
atomic rename, so exactly one replayer owns it; it is deleted once written and given
back if the write fails (joined to a file its owner started meanwhile, never replacing
it). A claim left by a replayer that died is given back too.
Rows the database refused (a data error, not an outage) go to ``refused-<pid>.jsonl``;
they are replayed only when an operator asks (``replay(write, "refused")``, by the
``replay-refused`` command, once the cause is fixed), whoever's they are: an append
holds an ``flock`` and checks its file is still the one its path names, so a claim
taken meanwhile loses nothing. A process's greenlets take turns at a file in gevent
before its ``flock`` (``_turn``). A file's owner counts as alive only if its pid is
alive and the process holding it was already running when the file last changed: a
process that took the pid later (a container restarted on the same volume numbers its
processes from 1 again: its master or a CLI can get a dead worker's pid) does not hold
a dead worker's rows back for as long as it runs. A line that is not a whole row (the
process was killed mid-append) is kept aside in ``torn-<pid>.jsonl`` and the rest of
its file is replayed; an append that fails (a full disk) is cut off again, and raises.
Journals hold prompts: every file is its owner's alone (0600), in a directory of its
owner's (0700).

A process's write-ahead files (``ahead.py``) share the directory; a dead owner's are
replayed like its journal (``replay(write, "ahead")``), never a live one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import gevent.lock

from gateway import jsoncodec, offloop

log = logging.getLogger(__name__)

_DATETIME_COLUMNS = ("created_at", "updated_at")
# Rows parsed and handed to a replay's writer at a time (a few MB of JSON: some 20 ms).
LOT = 1000


class Journal:
    """One directory of journal files, shared by the processes of one host."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def own_path(self, prefix: str = "journal") -> Path:
        return self.directory / f"{prefix}-{os.getpid()}.jsonl"

    def append(self, rows: list[dict], prefix: str = "journal", *, exiting: bool = False) -> None:
        """Append rows to this process's file and make them durable.

        ``exiting``: the process is about to exit (``Recorder.drain``), its calls stopped.
        The write and sync then keep the loop: a greenlet waiting for them beside it may
        be left behind by the exit (the worker does not wait for its shutdown guard),
        its rows taken from the queue and not on disk.
        """
        # default=str: a value JSON cannot hold must not cost the whole batch its record.
        # Encoded as the write-ahead file is: at shutdown the journal is what the last
        # second before the kill writes (an 8 MB answer: half the time of stdlib json,
        # two thirds of its size where the text is not ASCII).
        lines = b"".join(jsoncodec.encode(_jsonable(row), default=str) + b"\n" for row in rows)
        self._append(self.own_path(prefix), lines, exiting)

    def has_own(self) -> bool:
        """True while this process has rows waiting in its journal."""
        return self.own_path().exists()

    def waiting(self, prefix: str = "journal") -> bool:
        """True when this process would find something to replay."""
        return bool(self._claimable(prefix)) or any(self.directory.glob(f"replaying-*-{prefix}-*"))

    def replay(self, write: Callable[[list[dict]], None], prefix: str = "journal") -> int:
        """Give each claimable file's rows to ``write``, ``LOT`` at a time; return how
        many were written.

        ``journal``: this process's file and dead processes'. ``refused``: every
        process's, for an operator who fixed what the database refused them for.
        """
        if not self.directory.is_dir():
            return 0
        self._reclaim_orphans(prefix)
        written = 0
        for path in self._claimable(prefix):
            claimed = path.with_name(f"replaying-{os.getpid()}-{path.name}")
            try:
                path.rename(claimed)
            except FileNotFoundError:
                continue  # another replayer took it
            torn: list[bytes] = []
            count = 0
            try:
                # In lots, read as they are handed on: a file left by a long outage is
                # hundreds of MB; parsed whole, it kept the worker's loop (every call) for
                # a second per 100 MB, and read whole, twice its size in memory.
                with _settled(claimed, path) as lines:
                    for rows in _lots(lines, torn):
                        write(rows)
                        count += len(rows)
                        del rows  # not held while the next lot is read
            except BaseException:
                self._give_back(claimed, path)  # try again later, the lots written too
                raise
            if torn:
                log.error("journal: %d torn lines in %s kept aside", len(torn), path.name)
                self._append(self.own_path("torn"), b"".join(line + b"\n" for line in torn))
            claimed.unlink()
            written += count
            log.info("journal: replayed %d records from %s", count, path.name)
        return written

    def _give_back(self, claimed: Path, path: Path) -> None:
        """Return a claimed file whose rows were not written to the name it had.

        Its owner may have started a new file under that name meanwhile (a live
        process's appends go on while its journal is replayed): the claimed rows then
        join that file, since a rename would replace it and lose its rows. The order
        of rows does not matter (``writes.upsert_records`` takes snapshots in any
        order). A file system without hard links gets the rows appended likewise,
        which never replaces a file either (a block at a time: the file may be hundreds
        of MB). Should that fail too (a full disk), the claim stays, and is given back
        once this process has exited (``_reclaim_orphans``).
        """
        try:
            os.link(claimed, path)  # never replaces a file
        except OSError:  # the name is taken (FileExistsError), or no hard links here
            self._append(path, _blocks(claimed))
        claimed.unlink()

    def _append(self, path: Path, data: bytes | Iterable[bytes], exiting: bool = False) -> None:
        """Append ``data`` (bytes, or blocks of them) to ``path`` durably, both readable
        by this user only; or raise OSError and leave the file as it was. Written and
        synced beside the loop, unless ``exiting`` (``append``)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _turn(path):
            fd = _open_locked(path)
            try:
                with contextlib.suppress(OSError):  # someone else's file, made by hand
                    os.fchmod(fd, 0o600)  # one an older version made as the umask had it
                    os.chmod(self.directory, 0o700)
                end = os.fstat(fd).st_size
                try:
                    if exiting:
                        _write_durably(fd, data)
                    else:
                        offloop.run_to_end(_write_durably, (fd, data), "a journal append")
                except OSError:
                    # A full or failing disk took part of it: cut that off, or the next
                    # append would join it and both lines be torn (the rows are still
                    # ours). A file this append made goes: an empty one would read as
                    # rows waiting.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, end)
                        if not end:
                            path.unlink()
                    raise
            finally:
                os.close(fd)

    def _claimable(self, prefix: str = "journal") -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [
            path
            for path in sorted(self.directory.glob(f"{prefix}-*.jsonl"))
            # set-aside rows are anyone's; a live process replays its own journal, and
            # its write-ahead files are its own to delete (one a process before it left
            # under the same pid, before it began, is not)
            if prefix == "refused"
            or (prefix == "journal" and _pid_in(path.stem) == os.getpid())
            or not _ran_at(_pid_in(path.stem), _changed(path, "st_mtime"))
        ]

    def _reclaim_orphans(self, prefix: str) -> None:
        """Give back files claimed by a replayer that died before finishing."""
        for claimed in self.directory.glob(f"replaying-*-{prefix}-*.jsonl"):
            replayer = int(claimed.name.split("-", 2)[1])
            # The claim's rename set its ctime: the replayer was alive then.
            if replayer != os.getpid() and not _ran_at(replayer, _changed(claimed, "st_ctime")):
                original = claimed.with_name(claimed.name.split("-", 2)[2])
                with contextlib.suppress(FileNotFoundError):  # another process took it
                    self._give_back(claimed, original)


# Each file's turn, among this process's greenlets: an append holds the file's ``flock``
# while its write and sync wait beside the loop; another ``flock`` of this process on
# it would wait in the kernel, on the loop, which then never heard the first end.
_TURNS: weakref.WeakValueDictionary[str, gevent.lock.Semaphore] = weakref.WeakValueDictionary()


@contextlib.contextmanager
def _turn(path: Path) -> Iterator[None]:
    """This process's turn at ``path``'s ``flock``, waited for in gevent: take it first."""
    turn = _TURNS.get(str(path))
    if turn is None:
        turn = _TURNS[str(path)] = gevent.lock.Semaphore()
    with turn:
        yield


def _open_locked(path: Path) -> int:
    """``path`` opened to append, under this process's ``flock``, and still named so.

    Another process may claim the file (rename it) between the open and the lock; an
    append to the claimed file after its replayer read it would be lost with it. So
    the lock is taken, then the path checked to name the same file, else opened again.
    """
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        _lock(fd)  # held for one append: a replayer's read waits
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _write_durably(fd: int, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or blocks of them) at the end of ``fd``, and sync it."""
    for block in [data] if isinstance(data, bytes) else data:
        left = memoryview(block)
        while left:
            left = left[os.write(fd, left) :]
    os.fsync(fd)


def _lock(fd: int) -> None:
    """This process's exclusive ``flock`` on ``fd``, where the file system has them (a
    journal on one without them still takes appends, as before the lock)."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX)


@contextlib.contextmanager
def _settled(claimed: Path, name: Path) -> Iterator[BinaryIO]:
    """A claimed journal file, open to be read line by line, once no append can change
    it any more. ``name``: what it was called, whose turn an append of this process
    holds (``_turn``).

    Its ``flock`` is taken once, then let go: an append that opened the file before it
    was claimed has either ended by then (and is in what is read) or, once it holds the
    lock, finds the path naming another file and appends there (``_open_locked``). Not
    held while the file is read and its rows written: another process's append that
    waited for it would hold up that process's loop (``flock`` blocks) for as long.
    """
    with open(claimed, "rb") as fh:
        with _turn(name):
            _lock(fh.fileno())
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        yield fh


def _blocks(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    """A file's content a block at a time, ending in a newline if it has any content (a
    torn last line stays torn, not joined to the next line appended after it)."""
    last = b"\n"
    with open(path, "rb") as fh:
        while block := fh.read(size):
            last = block
            yield block
    if not last.endswith(b"\n"):
        yield b"\n"


def _lots(lines: Iterable[bytes], torn: list[bytes]) -> Iterator[list[dict]]:
    """The rows of a journal file's ``lines``, ``LOT`` at a time; the lines that are not
    whole rows go to ``torn``."""
    rows: list[dict] = []
    for line in lines:
        line = line.removesuffix(b"\n")
        if not line:
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # JSON and UTF-8 errors alike: an append cut short
            torn.append(line)
            continue
        if not isinstance(row, dict):
            torn.append(line)
            continue
        rows.append(_from_json(row))
        if len(rows) >= LOT:
            yield rows
            rows = []
    if rows:
        yield rows


def _pid_in(stem: str) -> int:
    return int(stem.rsplit("-", 1)[1])


def _jsonable(row: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


def _from_json(row: dict) -> dict:
    for column in _DATETIME_COLUMNS:
        if isinstance(row.get(column), str):
            row[column] = datetime.fromisoformat(row[column])
    return row


def _changed(path: Path, stamp: str) -> float | None:
    """``path``'s ``st_mtime`` (its content's last change) or ``st_ctime`` (its name's
    too); None if it is gone."""
    try:
        return getattr(path.stat(), stamp)
    except FileNotFoundError:
        return None


def _ran_at(pid: int, moment: float | None) -> bool:
    """True if process ``pid`` is alive and was already running at ``moment`` (a file's
    time), so it may be the process that changed the file then; not one that took the
    pid later. Where a start cannot be told (no /proc), alive is enough, as before."""
    if not _alive(pid):
        return False
    started = process_started(pid)
    return started is None or moment is None or started <= moment + _START_SLACK


# A process's start is known to a clock tick (10 ms); later than the file's change by
# more than this, it cannot have made the change.
_START_SLACK = 0.05


def process_started(pid: int) -> float | None:
    """When process ``pid`` started, on ``time.time()``'s clock; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            after_name = fh.read().rsplit(b")", 1)[1].split()
        ticks = int(after_name[19])  # field 22, starttime: clock ticks after boot
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError, AttributeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; it is someone else's
    return True
