"""The journal: durable appends, and replay that never loses or doubles a file."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import time
import tracemalloc
from datetime import datetime
from pathlib import Path

import gevent
import pytest

from gateway import journal as journal_module
from gateway.ahead import Ahead
from gateway.journal import Journal
from tests.loopwatch import assert_kept_turning, no_wait_in_flock, slow_disk, watch_loop
from tests.servers import wait_until


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def rows(n: int) -> list[dict]:
    return [
        {"uid": f"u{i}", "status": "completed", "created_at": datetime(2026, 1, 1, 0, 0, i)}
        for i in range(n)
    ]


def test_append_then_replay_round_trips_rows_and_datetimes(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(rows(2))
    journal.append(rows(3)[2:])
    assert journal.has_own()
    got: list[dict] = []
    assert journal.replay(got.extend) == 3
    assert got == rows(3)
    assert not journal.has_own() and list(tmp_path.iterdir()) == []


def test_any_text_a_row_holds_comes_back_as_it_went(tmp_path: Path) -> None:
    """Lines are cut at newlines: text that orjson writes as it is (U+2028, CJK) or that
    only stdlib json can write (a lone surrogate) must neither split a line nor change."""
    text = "数据 \u2028 \u2029 \r\n \x00 \ud800 🚢 \\"
    row = {
        "uid": "u", "created_at": datetime(2026, 1, 1, 0, 0, 0, 5),
        "completion": [{"content": text, "n": 2**63 - 1, "x": 0.1}], "error": text,
    }  # fmt: skip
    journal = Journal(tmp_path)
    journal.append([row, *rows(1)])
    got: list[dict] = []
    assert journal.replay(got.extend) == 2
    assert got == [row, *rows(1)]


def test_a_file_is_handed_to_the_writer_in_lots_and_given_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal left by a long outage is hundreds of MB: parsed whole, it kept the
    worker's loop (every call) for a second per 100 MB. A lot the database does not
    take gives the whole file back, the lots before it too (written again, harmlessly)."""
    monkeypatch.setattr(journal_module, "LOT", 2)
    journal = Journal(tmp_path)
    journal.append(rows(5))
    lots: list[list[dict]] = []

    def second_refused(lot: list[dict]) -> None:
        if len(lots) == 1:
            lots.append([])
            raise ConnectionError("database away again")
        lots.append(lot)

    with pytest.raises(ConnectionError):
        journal.replay(second_refused)
    lots = []
    assert journal.replay(lots.append) == 5
    assert lots == [rows(5)[:2], rows(5)[2:4], rows(5)[4:]]
    assert list(tmp_path.iterdir()) == []


def test_a_big_file_is_replayed_and_given_back_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long outage leaves a journal of hundreds of MB: read whole (and split), it took
    twice its size in memory at each replay, and giving it back read it whole again. Read
    as it is handed on, a replay holds about a lot of rows at a time, whatever the size."""
    monkeypatch.setattr(journal_module, "LOT", 100)  # some 800 kB of these rows
    journal = Journal(tmp_path)
    pad = "x" * 8000
    count = 6000
    with open(journal.own_path(), "w") as fh:
        for i in range(count):
            fh.write(json.dumps({"uid": f"u{i}", "status": "completed", "prompt": pad}) + "\n")
    size = journal.own_path().stat().st_size
    assert size > 48_000_000

    def away_while_others_journal(_: list[dict]) -> None:
        journal.append([{"uid": "meanwhile"}])  # the name is taken: given back by a copy
        raise ConnectionError("database does not answer")

    uids: list[str] = []

    def written(lot: list[dict]) -> None:
        uids.extend(row["uid"] for row in lot)  # the rows themselves are not kept

    tracemalloc.start()
    try:
        with pytest.raises(ConnectionError):
            journal.replay(away_while_others_journal)
        _, given_back = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert journal.replay(written) == count + 1
        _, replayed = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert given_back < size / 10, f"{given_back / 1e6:.0f} MB to give back {size / 1e6:.0f} MB"
    assert replayed < size / 10, f"{replayed / 1e6:.0f} MB to replay {size / 1e6:.0f} MB"
    assert sorted(uids) == sorted([*(f"u{i}" for i in range(count)), "meanwhile"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_failed_write_gives_the_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    if not links:  # some network and FAT mounts: the claim comes back all the same

        def no_links(*_: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(journal_module.os, "link", no_links)
    journal = Journal(tmp_path)
    journal.append(rows(2))

    def refuse(_: list[dict]) -> None:
        raise ConnectionError("database still away")

    with pytest.raises(ConnectionError):
        journal.replay(refuse)
    assert [p.name for p in tmp_path.iterdir()] == [journal.own_path().name]
    got: list[dict] = []
    journal.replay(got.extend)
    assert [r["uid"] for r in got] == ["u0", "u1"]


def in_a_child(script: str, directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, str(directory)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )


# A child process whose file size limit stops an append halfway, as a full disk does: the
# kernel writes what fits and refuses the rest (EFBIG here, ENOSPC on a full disk).
HALF_WRITTEN = """
import resource, signal, sys
from pathlib import Path
from gateway.journal import Journal

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # refuse the write, do not kill the process
journal = Journal(Path(sys.argv[1]))
journal.append([{"uid": "before"}])
size = journal.own_path().stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, resource.RLIM_INFINITY))
try:
    journal.append([{"uid": "refused", "pad": "x" * 100}])
except OSError as exc:
    print("refused", exc.errno, journal.own_path().stat().st_size - size)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
journal.append([{"uid": "after"}])
"""


NOTHING_WRITTEN = """
import resource, signal, sys
from pathlib import Path
from gateway.journal import Journal

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
journal = Journal(Path(sys.argv[1]))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
try:
    journal.append([{"uid": "refused"}])
except OSError as exc:
    print("refused", exc.errno, journal.has_own())
"""


def test_rows_journaled_while_a_replay_fails_are_kept_with_the_given_back_ones(
    tmp_path: Path,
) -> None:
    # The replayer waits on a database that does not answer; meanwhile this process's
    # writers journal more calls, to a new file under the claimed one's name. Giving the
    # claim back must not replace that file (a rename did: its rows were lost).
    journal = Journal(tmp_path)
    journal.append(rows(2))

    def away_while_others_journal(_: list[dict]) -> None:
        journal.append(rows(4)[2:])
        raise ConnectionError("database does not answer")

    with pytest.raises(ConnectionError):
        journal.replay(away_while_others_journal)
    assert [p.name for p in tmp_path.iterdir()] == [journal.own_path().name]
    got: list[dict] = []
    assert journal.replay(got.extend) == 4
    assert sorted(r["uid"] for r in got) == ["u0", "u1", "u2", "u3"]


def test_a_refused_file_given_back_keeps_rows_its_owner_set_aside_meanwhile(
    tmp_path: Path,
) -> None:
    # replay-refused takes any live process's refused rows; the owner may set more aside.
    journal = Journal(tmp_path)
    journal.append(rows(1), prefix="refused")
    with open(journal.own_path("refused"), "a") as fh:
        fh.write('{"uid": "to')  # a torn last line stays a line of its own

    def refused_again(_: list[dict]) -> None:
        journal.append(rows(2)[1:], prefix="refused")
        raise ConnectionError("database does not answer")

    with pytest.raises(ConnectionError):
        journal.replay(refused_again, prefix="refused")
    got: list[dict] = []
    assert journal.replay(got.extend, prefix="refused") == 2
    assert sorted(r["uid"] for r in got) == ["u0", "u1"]
    assert journal.own_path("torn").read_text() == '{"uid": "to\n'


def test_an_append_the_disk_takes_only_part_of_is_cut_off_and_the_next_one_is_whole(
    tmp_path: Path,
) -> None:
    done = in_a_child(HALF_WRITTEN, tmp_path)
    assert done.stdout.split() == ["refused", "27", "0"]  # EFBIG; nothing of it left
    got: list[dict] = []
    assert Journal(tmp_path).replay(got.extend) == 2
    assert [r["uid"] for r in got] == ["before", "after"]
    assert not list(tmp_path.glob("torn-*"))


def test_an_append_the_disk_refuses_whole_leaves_no_file(tmp_path: Path) -> None:
    """Nothing of the rows written: no empty file says rows are waiting."""
    done = in_a_child(NOTHING_WRITTEN, tmp_path)
    assert done.stdout.split() == ["refused", "27", "False"]
    assert list(tmp_path.iterdir()) == []


def test_a_dead_process_journal_is_replayed_and_a_live_one_is_left_alone(tmp_path: Path) -> None:
    dead, alive = dead_pid(), os.getppid()
    for pid, uid in ((dead, "from-dead"), (alive, "from-live")):
        (tmp_path / f"journal-{pid}.jsonl").write_text(json.dumps({"uid": uid}) + "\n")
    got: list[dict] = []
    Journal(tmp_path).replay(got.extend)
    assert got == [{"uid": "from-dead"}]
    assert (tmp_path / f"journal-{alive}.jsonl").exists()


def test_a_claim_left_by_a_dead_replayer_is_given_back(tmp_path: Path) -> None:
    dead = dead_pid()
    (tmp_path / f"replaying-{dead}-journal-{dead}.jsonl").write_text(
        json.dumps({"uid": "stranded"}) + "\n"
    )
    got: list[dict] = []
    Journal(tmp_path).replay(got.extend)
    assert got == [{"uid": "stranded"}]
    assert list(tmp_path.iterdir()) == []


def test_a_dead_replayers_claim_joins_the_file_its_writers_started_meanwhile(
    tmp_path: Path,
) -> None:
    # A worker killed while it replayed its journal: its writers had started a new file.
    dead = dead_pid()
    (tmp_path / f"replaying-{dead}-journal-{dead}.jsonl").write_text(
        json.dumps({"uid": "claimed"}) + "\n"
    )
    (tmp_path / f"journal-{dead}.jsonl").write_text(json.dumps({"uid": "journaled later"}) + "\n")
    got: list[dict] = []
    Journal(tmp_path).replay(got.extend)
    assert sorted(r["uid"] for r in got) == ["claimed", "journaled later"]
    assert list(tmp_path.iterdir()) == []


def test_a_journal_whose_pid_a_later_process_took_is_replayed(tmp_path: Path) -> None:
    """A container restarted on the same volume numbers its processes from 1 again: its
    master or a CLI can get a dead worker's pid. That process started after the file's
    last append, so it is not the file's owner: the rows are replayed at once, not once
    it exits. A process that was running at the append is still the owner."""
    later = subprocess.Popen(["sleep", "30"])
    try:
        wait_until(lambda: journal_module.process_started(later.pid) is not None)
        path = tmp_path / f"journal-{later.pid}.jsonl"
        path.write_text(json.dumps({"uid": "a dead worker's"}) + "\n")
        appended = journal_module.process_started(later.pid) - 1.0  # before the pid's taker began
        os.utime(path, (appended, appended))
        owner = tmp_path / f"journal-{os.getppid()}.jsonl"  # running since before the append
        owner.write_text(json.dumps({"uid": "a live owner's"}) + "\n")
        got: list[dict] = []
        assert Journal(tmp_path).replay(got.extend) == 1
        assert got == [{"uid": "a dead worker's"}]
        assert [p.name for p in tmp_path.iterdir()] == [owner.name]
    finally:
        later.kill()
        later.wait()


def test_a_claim_whose_replayer_pid_a_later_process_took_is_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim's rename is its ctime, which no test can set back: the later process's
    start is moved forward instead."""
    live = os.getppid()
    claimed = tmp_path / f"replaying-{live}-journal-{dead_pid()}.jsonl"
    claimed.write_text(json.dumps({"uid": "stranded"}) + "\n")
    got: list[dict] = []
    Journal(tmp_path).replay(got.extend)
    assert got == [] and claimed.exists()  # its replayer was running at the claim
    started = journal_module.process_started
    monkeypatch.setattr(
        journal_module,
        "process_started",
        lambda pid: time.time() + 10 if pid == live else started(pid),
    )
    Journal(tmp_path).replay(got.extend)
    assert got == [{"uid": "stranded"}] and list(tmp_path.iterdir()) == []


def test_refused_rows_are_kept_apart_and_never_replayed(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(rows(1), prefix="refused")
    got: list[dict] = []
    assert journal.replay(got.extend) == 0 and got == []
    assert journal.own_path("refused").exists() and not journal.has_own()


def test_refused_rows_are_replayed_when_asked_whoever_set_them_aside(tmp_path: Path) -> None:
    """An operator's replay takes every process's set-aside rows, live or dead; the
    journal's own replay keeps taking only its own and the dead's journals."""
    journal = Journal(tmp_path)
    journal.append(rows(1), prefix="refused")  # this process's: live
    dead, live = dead_pid(), os.getppid()
    for pid, uid in ((dead, "dead"), (live, "live")):
        (tmp_path / f"refused-{pid}.jsonl").write_text(json.dumps({"uid": uid}) + "\n")
    (tmp_path / f"journal-{live}.jsonl").write_text(json.dumps({"uid": "its own"}) + "\n")
    got: list[dict] = []
    assert journal.replay(got.extend, prefix="refused") == 3
    assert sorted(r["uid"] for r in got) == ["dead", "live", "u0"]
    assert [p.name for p in tmp_path.iterdir()] == [f"journal-{live}.jsonl"]
    assert not journal.waiting(), "a live process's journal is its own to replay"


def test_a_refused_claim_left_by_a_dead_replayer_is_given_back(tmp_path: Path) -> None:
    dead, owner = dead_pid(), dead_pid()
    stranded = tmp_path / f"replaying-{dead}-refused-{owner}.jsonl"
    stranded.write_text(json.dumps({"uid": "stranded"}) + "\n")
    journal = Journal(tmp_path)
    assert not journal.waiting(), "a refused file is not the journal's to replay"
    assert journal.replay(lambda _: None) == 0 and stranded.exists()
    got: list[dict] = []
    assert journal.replay(got.extend, prefix="refused") == 1
    assert got == [{"uid": "stranded"}] and list(tmp_path.iterdir()) == []


APPENDER = """
import sys
from pathlib import Path
from gateway.journal import Journal
journal = Journal(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    journal.append([{"uid": f"u{i}"}], prefix="refused")
"""


def test_an_append_racing_a_replay_of_its_file_is_never_lost(tmp_path: Path) -> None:
    """A live worker appends to its refused file while an operator's replay claims it
    over and over: an append to a file claimed and read meanwhile would be lost.
    Each row must be replayed exactly once."""
    appends = 3000
    appender = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(tmp_path), str(appends)],
        cwd=Path(__file__).resolve().parent.parent,
    )
    got: list[dict] = []
    claims = 0
    journal = Journal(tmp_path)
    while appender.poll() is None:
        claims += bool(journal.replay(got.extend, prefix="refused"))
    assert appender.returncode == 0
    journal.replay(got.extend, prefix="refused")
    uids = [r["uid"] for r in got]
    assert claims > 20, "the replays did not race the appends"
    assert len(uids) == len(set(uids)), "a row replayed twice"
    assert sorted(uids) == sorted(f"u{i}" for i in range(appends)), (
        f"{appends - len(set(uids))} rows lost"
    )


def test_a_file_system_without_locks_still_takes_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    journal = Journal(tmp_path)
    journal.append(rows(2))
    journal.append(rows(1), prefix="refused")
    got: list[dict] = []
    assert journal.replay(got.extend) == 2 and journal.replay(got.extend, prefix="refused") == 1
    assert got == rows(2) + rows(1)


def test_a_torn_line_is_kept_aside_and_the_rest_of_the_file_replayed(tmp_path: Path) -> None:
    """A worker killed mid-append leaves half a line (even half a UTF-8 character)."""
    dead = dead_pid()
    good = [json.dumps({"uid": "before"}), json.dumps({"uid": "after"})]
    torn = ['{"uid": "half', '"a string, not a row"']
    body = (
        f"{good[0]}\n{torn[0]}\n{torn[1]}\n".encode()
        + b'{"uid": "\xe4\xb8\n'
        + f"{good[1]}\n".encode()
    )
    (tmp_path / f"journal-{dead}.jsonl").write_bytes(body)
    got: list[dict] = []
    assert Journal(tmp_path).replay(got.extend) == 2
    assert [r["uid"] for r in got] == ["before", "after"]
    (aside,) = tmp_path.glob("torn-*.jsonl")
    assert aside.read_bytes().splitlines() == [t.encode() for t in torn] + [b'{"uid": "\xe4\xb8']
    assert [p.name for p in tmp_path.iterdir()] == [aside.name]  # nothing left claimed


def test_torn_lines_are_kept_aside_once_even_if_the_write_is_retried(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(rows(1))
    with open(journal.own_path(), "a") as fh:
        fh.write('{"uid": "ha')

    def refuse(_: list[dict]) -> None:
        raise ConnectionError("database still away")

    with pytest.raises(ConnectionError):
        journal.replay(refuse)
    assert not list(tmp_path.glob("torn-*"))
    journal.replay(lambda _: None)
    assert journal.own_path("torn").read_text() == '{"uid": "ha\n'


def test_journal_files_are_their_owners_alone(tmp_path: Path) -> None:
    # They hold prompts: 0600 files in a 0700 directory, whatever the umask, also where
    # an older version left them readable.
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    journal = Journal(directory)
    old = journal.own_path("refused")
    old.write_text("")
    old.chmod(0o644)
    journal.append(rows(1))
    journal.append(rows(1), prefix="refused")
    assert journal.own_path().stat().st_mode & 0o777 == 0o600
    (directory / f"journal-{dead_pid()}.jsonl").write_bytes(b'{"uid": "ha\n')
    journal.replay(lambda rows: None)  # keeps the torn line aside
    for path in (old, journal.own_path("torn")):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert directory.stat().st_mode & 0o777 == 0o700
    fresh = Journal(tmp_path / "fresh" / "journal")
    fresh.append(rows(1))
    assert fresh.directory.stat().st_mode & 0o777 == 0o700
    assert fresh.own_path().stat().st_mode & 0o777 == 0o600


# -- a busy disk -------------------------------------------------------------------------


def test_an_append_syncs_beside_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch of a database outage is journaled: its sync, on the loop, stopped
    every call of the worker for as long as the disk took (SPEC rule 8)."""
    slow_disk(monkeypatch)
    journal = Journal(tmp_path)
    with watch_loop() as watch:
        journal.append(rows(2))
    assert_kept_turning(watch)
    got: list[dict] = []
    assert journal.replay(got.extend) == 2 and got == rows(2)


def test_appends_and_a_replay_in_one_process_wait_for_each_other_in_gevent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL runs four writers a worker: one append holds the file's ``flock`` while
    its sync waits beside the loop. Another append, or the replay claiming the file,
    must queue behind it in gevent, not in the kernel on the loop."""
    slow_disk(monkeypatch)
    no_wait_in_flock(monkeypatch)
    journal = Journal(tmp_path)
    got: list[dict] = []
    batches = [rows(3)[:2], rows(3)[2:]]
    with gevent.Timeout(10, AssertionError("the appends never ended")):
        greenlets = [gevent.spawn(journal.append, batch) for batch in batches]
        greenlets.append(gevent.spawn(journal.replay, got.extend))  # claims the first's file
        gevent.joinall(greenlets, raise_error=True)
    journal.replay(got.extend)
    assert sorted(got, key=lambda row: row["uid"]) == rows(3)
    assert list(tmp_path.iterdir()) == []


# -- the write-ahead files ---------------------------------------------------------------


def _ahead_files(directory: Path) -> dict[str, int]:
    return {p.name: len(p.read_bytes().splitlines()) for p in directory.glob("ahead-*")}


def test_write_ahead_lines_stay_until_every_call_unwritten_at_rotation_is_taken(
    tmp_path: Path,
) -> None:
    ahead = Ahead(tmp_path)
    ahead.append({"uid": "a", "status": "pending", "created_at": datetime(2026, 1, 1)})
    ahead.append({"uid": "b", "status": "pending"})
    first = f"ahead-1-{os.getpid()}.jsonl"
    assert _ahead_files(tmp_path) == {first: 2}
    ahead.rotate({"a", "b"})  # both still unwritten
    ahead.append({"uid": "a", "status": "completed"})
    second = f"ahead-2-{os.getpid()}.jsonl"
    assert _ahead_files(tmp_path) == {first: 2, second: 1}
    ahead.taken({"a"})
    assert first in _ahead_files(tmp_path)  # b's line is still needed
    ahead.taken({"b"})
    assert _ahead_files(tmp_path) == {second: 1}
    ahead.clear()  # nothing unwritten, but a small file is not cut back
    assert _ahead_files(tmp_path) == {second: 1}
    ahead.TRIM = 1
    ahead.clear()  # past TRIM: the lines go
    assert _ahead_files(tmp_path) == {second: 0}
    ahead.append({"uid": "c", "status": "pending"})
    ahead.close(remove=True)
    assert _ahead_files(tmp_path) == {}


def test_write_ahead_files_are_replayed_only_once_their_process_is_dead(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    mine = Ahead(tmp_path)
    mine.append({"uid": "mine", "status": "pending"})
    dead = tmp_path / f"ahead-3-{dead_pid()}.jsonl"
    dead.write_text(json.dumps({"uid": "theirs", "status": "completed"}) + "\n")
    assert journal.waiting("ahead") and not journal.waiting()
    got: list[dict] = []
    assert journal.replay(got.extend, prefix="ahead") == 1
    assert got == [{"uid": "theirs", "status": "completed"}] and not dead.exists()
    assert not journal.waiting("ahead")  # a live process's own are its own to delete


def test_a_write_ahead_file_the_disk_refuses_is_kept_until_taken_and_the_next_one_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ahead = Ahead(tmp_path)
    ahead.append({"uid": "a", "status": "pending"})
    real_write = os.write
    monkeypatch.setattr(
        journal_module.os,
        "write",
        lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")),
    )
    ahead.append({"uid": "b", "status": "pending"})  # refused: no raise, a warning
    assert ahead.full
    monkeypatch.setattr(journal_module.os, "write", real_write)
    ahead.rotate({"a", "b"})
    ahead.append({"uid": "c", "status": "pending"})
    assert sorted(_ahead_files(tmp_path).values()) == [1, 1]
    ahead.taken({"a", "b"})
    assert list(_ahead_files(tmp_path).values()) == [1]


def test_a_write_ahead_file_left_under_this_pid_before_this_process_began_is_replayed(
    tmp_path: Path,
) -> None:
    # A container restarted on the same volume numbers its processes from 1 again: a
    # worker can get the pid of one that died before the restart, with its lines unread.
    left = tmp_path / f"ahead-1-{os.getpid()}.jsonl"
    left.write_text(json.dumps({"uid": "before", "status": "completed"}) + "\n")
    long_ago = time.time() - 86400
    os.utime(left, (long_ago, long_ago))
    mine = Ahead(tmp_path)
    mine.append({"uid": "mine", "status": "pending"})  # a name of its own, not over it
    assert _ahead_files(tmp_path) == {left.name: 1, f"ahead-2-{os.getpid()}.jsonl": 1}
    got: list[dict] = []
    assert Journal(tmp_path).replay(got.extend, prefix="ahead") == 1
    assert got == [{"uid": "before", "status": "completed"}]
    assert list(_ahead_files(tmp_path)) == [f"ahead-2-{os.getpid()}.jsonl"]
