"""The snapshot file's replacement among a host's processes: the newest read wins, and
a write takes the keys its process knows were revoked out of a later read's file."""

from __future__ import annotations

import json
import stat
from datetime import datetime
from pathlib import Path

import pytest

from gateway import snapshot_file

EARLY, LATE = datetime(2026, 1, 1, 10), datetime(2026, 1, 1, 11)


def body(read_at: datetime | None, *hashes: str) -> str:
    """A snapshot as ``Refresher._write`` lays it out: its read's start in its first bytes."""
    written = {"written_at": "2026-01-01T12:00:00", "read_at": read_at and read_at.isoformat()}
    rows = [[h, 1, 5, 5, None] for h in hashes]
    return json.dumps({**written, "schema": ["0001_initial"], "keys": rows, "catalog": []})


def replaced(
    path: Path, text: str, read_at: datetime | None, revoked: frozenset[str] = frozenset()
) -> dict:
    snapshot_file.replace(path, text, read_at, revoked)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [".snapshot.json.lock", path.name]
    return json.loads(path.read_text())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "snapshot.json"


def test_a_write_replaces_no_file_an_older_read_or_one_of_unknown_age(path: Path) -> None:
    assert replaced(path, body(EARLY, "a"), EARLY)["keys"][0][0] == "a"
    assert replaced(path, body(LATE, "b"), LATE)["keys"][0][0] == "b"
    assert replaced(path, body(LATE, "c"), LATE)["keys"][0][0] == "c", "its own read again"
    for unknown in (body(None, "x"), json.dumps({"keys": [], "read_at": LATE.isoformat()})):
        path.write_text(unknown)  # an earlier build's, or one put there by hand
        assert replaced(path, body(EARLY, "d"), EARLY)["keys"][0][0] == "d"


def test_a_later_read_s_file_stays_without_the_keys_revoked_since(path: Path) -> None:
    path.write_text(body(LATE, "kept", "revoked"))
    path.chmod(0o644)  # put there by hand
    kept = replaced(path, body(EARLY, "kept"), EARLY)  # it knows of no revocation
    assert kept["read_at"] == LATE.isoformat() and len(kept["keys"]) == 2
    assert replaced(path, body(None, "kept"), None) == kept, "ours of unknown age"
    saved = replaced(path, body(EARLY, "kept"), EARLY, frozenset({"revoked", "unknown"}))
    assert saved["read_at"] == LATE.isoformat() and [r[0] for r in saved["keys"]] == ["kept"]
    assert saved["written_at"] != "2026-01-01T12:00:00"


def test_a_later_read_s_file_that_cannot_be_read_gives_way(path: Path) -> None:
    path.write_text(body(LATE, "revoked")[:-20])  # its head says later; the rest is torn
    assert replaced(path, body(EARLY, "ours"), EARLY, frozenset({"revoked"}))["read_at"] == (
        EARLY.isoformat()
    )
