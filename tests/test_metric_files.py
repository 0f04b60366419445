"""The metrics' files on a full disk: a change fails with OSError, never the process.

Each case runs in a child process, on a small tmpfs of the test's own filled to the
last byte (``disk``: root): the library's own file class kills its process there, and
a test process must not be the one killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.servers import ROOT, Disk

MAKE = """
import errno, sys
from prometheus_client import mmap_dict
from gateway.metric_files import AllocatedMmapedDict

kind, path = sys.argv[1], sys.argv[2]
make = AllocatedMmapedDict if kind == "ours" else mmap_dict.MmapedDict
try:
    make(path)
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""

GROW = """
import errno, json, sys
from gateway.metric_files import AllocatedMmapedDict
from tests.servers import Disk

disk = Disk(__import__("pathlib").Path(sys.argv[1]))
values = AllocatedMmapedDict(str(disk.path / "counter_1.db"))
key = "x" * 100
written = 0
while values._used + 200 < values._capacity:  # fills the file's first 64 KB
    values.write_value(f"{key}{written}", float(written), 0.0)
    written += 1
disk.fill()
failed = None
try:
    for i in range(written, written + 50):  # past the file's capacity: it must grow
        values.write_value(f"{key}{i}", float(i), 0.0)
except OSError as exc:
    failed = errno.errorcode[exc.errno]
kept = all(values.read_value(f"{key}{i}")[0] == i for i in range(written))
capacity = values._capacity
disk.free()
for i in range(written, written + 50):
    values.write_value(f"{key}{i}", float(i), 0.0)
print(json.dumps({
    "failed": failed,
    "kept": kept,
    "capacity": capacity,
    "grown": values._capacity,
    "all": all(values.read_value(f"{key}{i}")[0] == i for i in range(written + 50)),
}))
"""


WORKER = """
from gateway import metrics
metrics.call_opened()
metrics.journal_depth(3)
print(metrics.JOURNAL_DEPTH._value.get())
"""


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
    )


def test_a_file_made_on_a_full_disk_is_refused_where_the_library_s_own_kills(
    disk: Disk,
) -> None:
    disk.fill()
    theirs = run(MAKE, "theirs", str(disk.path / "theirs.db"))
    assert theirs.returncode == -signal.SIGBUS, theirs  # what this module is for
    ours = run(MAKE, "ours", str(disk.path / "ours.db"))
    assert (ours.returncode, ours.stdout.strip()) == (0, "ENOSPC"), ours
    assert not (disk.path / "ours.db").exists(), "no empty file for a scrape to choke on"


def test_a_file_that_cannot_grow_keeps_its_values_and_grows_once_there_is_room(
    disk: Disk,
) -> None:
    done = run(GROW, str(disk.path))
    assert done.returncode == 0, done
    assert json.loads(done.stdout) == {
        "failed": "ENOSPC",
        "kept": True,
        "capacity": 65536,  # as it was: the failed growth left no trace
        "grown": 131072,
        "all": True,
    }


def test_a_file_is_allocated_whole_not_sparse(tmp_path: Path) -> None:
    done = run(MAKE, "ours", str(tmp_path / "ours.db"))
    assert done.returncode == 0, done
    made = (tmp_path / "ours.db").stat()
    assert made.st_size == 65536 and made.st_blocks * 512 >= 65536


def test_a_worker_starting_on_a_full_disk_keeps_its_values_to_itself(disk: Disk) -> None:
    """Its files cannot be made: its values live in its memory (missing from scrapes),
    and it starts and counts all the same, saying so once."""
    directory = disk.path / "metrics"
    directory.mkdir()
    disk.fill()
    done = run(WORKER, PROMETHEUS_MULTIPROC_DIR=str(directory))
    assert (done.returncode, done.stdout.strip()) == (0, "3.0"), done
    assert done.stderr.count("metrics: could not write a value") == 1, done.stderr
    assert list(directory.iterdir()) == []
