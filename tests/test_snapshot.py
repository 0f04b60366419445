"""The last known keys and catalog: served while the database is away, refreshed when back.

These drive the process-wide ``refresher`` with ``auth.keys`` and ``routing.catalog``
in the background mode a worker runs (a long ``CACHE_TTL``, so only the test decides
when a read happens), then put them back in read-through mode for the other tests.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import gevent
import pytest
from flask import Flask
from gevent import monkey

from gateway import db
from gateway.auth import REVOKED, keys
from gateway.config import DEFAULTS
from gateway.db import database, open_database
from gateway.errors import NotFound
from gateway.models import ApiKey, Model, Provider, utcnow
from gateway.routing import catalog
from gateway.snapshot import refresher
from gateway.vault import vault
from tests import pools
from tests.loopwatch import (
    SYNC_TAKES,
    assert_kept_turning,
    no_wait_in_flock,
    slow_disk,
    watch_loop,
)
from tests.servers import ENCRYPTION_KEY, ROOT, Disk, away, unreachable, wait_until


def configure(tmp_path: Path, **config: object) -> None:
    refresher.init_app(_app(tmp_path, **config))


def _app(tmp_path: Path, **config: object) -> Flask:
    app = Flask("snapshot-test", instance_path=str(tmp_path))
    app.config.update(DEFAULTS)
    app.config.update(CACHE_TTL=3600, SNAPSHOT_FILE=str(tmp_path / "snapshot.json"))
    app.config.update(ENCRYPTION_KEYS=ENCRYPTION_KEY, **config)
    return app


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[dict]:
    """A key, a revoked key and a model in the database; the caches loaded from it."""
    database.initialize(open_database(database_url))
    vault.init_app(_app(tmp_path))  # provider keys are sealed in the database
    with database.connection_context():
        live, live_key = ApiKey.issue(rpm_limit=7)
        _, revoked_key = ApiKey.issue(revoked=True)
        provider = Provider.create(name="p", base_url="http://up", api_key="provider-secret")
        Model.create(provider=provider, system_name="m", remote_id="m-remote")
    configure(tmp_path)
    # The refresher's own first read must be over. (A read of the previous test's
    # database, dropped meanwhile, may still fail and mark the database down once.)
    for _ in range(3):
        db.mark_reachable(True)
        if refresher.fresh(time.monotonic()):
            break
    else:
        raise AssertionError("the refresher cannot read the test database")
    yield {"key": live_key, "id": live.id, "revoked": revoked_key, "provider": provider}
    db.mark_reachable(True)
    configure(tmp_path, CACHE_TTL=0)  # read through again, as the other tests expect
    pools.release(database.obj)


def timed(fn, *args):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    try:
        return fn(*args), time.monotonic() - started
    except NotFound as exc:
        return exc, time.monotonic() - started


def test_keys_and_the_catalog_are_served_while_the_database_is_away(
    world: dict, database_url: str
) -> None:
    with away(unreachable(database_url)):
        assert not refresher.refresh() and not db.reachable()
        caller, took = timed(keys.get, world["key"])
        assert caller.id == world["id"] and caller.rpm_limit == 7 and took < 0.05
        assert [c.remote_id for c in catalog.lookup("m")] == ["m-remote"]
        # Unknown keys and models are refused at once: no wait on a database known down.
        assert timed(keys.get, world["revoked"]) < (None, 0.05)
        assert timed(keys.get, "sk-" + "0" * 32) < (None, 0.05)
        missing, took = timed(catalog.lookup, "nope")
        assert isinstance(missing, NotFound) and took < 0.05
    # Back. Changes made meanwhile are read in full, whatever their stamps say (here:
    # a host whose clock is a day behind).
    with database.connection_context():
        ApiKey.update(revoked=True, updated_at=utcnow() - timedelta(days=1)).execute()
    assert refresher.refresh() and db.reachable()
    assert keys.get(world["key"]) is None


def test_a_worker_started_during_an_outage_serves_the_snapshot_file(
    world: dict, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "snapshot.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert ApiKey.hash(world["key"]) in text and world["key"] not in text
    assert ApiKey.hash(world["revoked"]) not in text
    assert "provider-secret" not in text  # sealed as the database keeps it
    assert vault.open(json.loads(text)["catalog"][0]["api_key"]) == "provider-secret"
    keys.load([]), catalog.load([])  # a new process knows nothing
    with away(unreachable(database_url)):
        configure(tmp_path)
        assert keys.get(world["key"]).rpm_limit == 7
        assert [c.remote_id for c in catalog.lookup("m")] == ["m-remote"]
        assert catalog.lookup("m")[0].api_key == "provider-secret"
        assert keys.get(world["revoked"]) is None
    # Back: the first read is a full one, so a revocation made meanwhile is seen.
    with database.connection_context():
        ApiKey.update(revoked=True, updated_at=utcnow() - timedelta(days=1)).execute()
    assert refresher.refresh()
    assert keys.get(world["key"]) is None


def test_a_gateway_starts_without_the_database_only_from_a_snapshot_of_its_own_schema(
    world: dict, tmp_path: Path
) -> None:
    """What ``flask prepare`` asks when the database does not answer (the whole start is
    ``test_server_outage_keys.py``'s): a file written by this build serves; one written by a
    build with other migrations (its rows may not fit this one's tables), one this build
    cannot load, an unreadable one or none stops the start, saying why."""
    path = tmp_path / "snapshot.json"
    usable, what = refresher.usable()
    assert usable and str(path) in what and "written 20" in what, what
    data = json.loads(path.read_text())
    assert data["schema"] == list(db.known_migrations()) and data["schema"][0] == "0001_initial"
    path.write_text(json.dumps({**data, "schema": data["schema"][:-1]}))
    assert refresher.usable() == (False, f"{path} was written by a build with other migrations")
    path.write_text(json.dumps({**data, "keys": [["not", "a", "key"]]}))  # not this build's
    assert not refresher.usable()[0] and "ValueError" in refresher.usable()[1]
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "schema"}))  # older build
    assert refresher.usable() == (False, f"{path} is unreadable (KeyError: 'schema')")
    path.write_text(path.read_text()[:-10])
    assert not refresher.usable()[0] and "JSONDecodeError" in refresher.usable()[1]
    path.unlink()
    assert refresher.usable() == (
        False,
        f"there is no {path} (workers write it once they read the keys)",
    )


def test_a_snapshot_the_disk_cannot_take_leaves_the_last_one_and_nothing_else(
    world: dict, disk: Disk, tmp_path: Path
) -> None:
    """And the next read writes it, even with nothing changed since: else a key revoked
    while the disk was full would stay in the file a worker starting in an outage reads."""
    path = disk.path / "snapshot.json"
    configure(tmp_path, SNAPSHOT_FILE=str(path))
    live = ApiKey.hash(world["key"])
    assert refresher.refresh() and live in path.read_text()
    with database.connection_context():
        ApiKey.update(revoked=True, updated_at=utcnow()).where(ApiKey.id == world["id"]).execute()
    disk.fill()
    assert refresher.refresh()  # the read worked; the write did not, and says so
    assert live in path.read_text() and json.loads(path.read_text())["keys"], "the last, whole"
    assert sorted(p.name for p in disk.path.iterdir()) == [
        ".snapshot.json.lock",  # the writers' flock, empty
        "filler",
        "snapshot.json",
    ]
    disk.free()
    assert refresher.refresh() and live not in path.read_text()


def test_a_snapshot_is_synced_beside_the_loop(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written after each read that changed something and at every revocation: its sync,
    on the loop, stopped every call of the worker for as long as a busy disk took."""
    slow_disk(monkeypatch)
    with database.connection_context():
        ApiKey.update(rpm_limit=8, updated_at=utcnow()).where(ApiKey.id == world["id"]).execute()
    with watch_loop() as watch:
        assert refresher.refresh()
    assert_kept_turning(watch)
    saved = json.loads((tmp_path / "snapshot.json").read_text())
    assert [row[2] for row in saved["keys"] if row[0] == ApiKey.hash(world["key"])] == [8]


def test_a_revocation_announced_while_the_snapshot_is_written_is_written_after_it(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two writes of one worker at once (a read's, a revocation's) shared one file aside:
    the second cut the first's short, and the first renamed it away from under it. The
    second waits its turn in gevent, never for this process's ``flock`` in the kernel."""
    slow_disk(monkeypatch)
    no_wait_in_flock(monkeypatch)
    path, live = tmp_path / "snapshot.json", ApiKey.hash(world["key"])
    aside = path.with_name(f".snapshot.json.{os.getpid()}")
    with database.connection_context():
        ApiKey.update(rpm_limit=8, updated_at=utcnow()).where(ApiKey.id == world["id"]).execute()
    reading = gevent.spawn(refresher.refresh)
    wait_until(lambda: aside.exists() or reading.dead, interval=0.01)
    keys.changed(REVOKED + live)  # announced while the read's write waits for the disk
    assert reading.get(timeout=5)
    wait_until(lambda: live not in path.read_text())
    gevent.sleep(3 * SYNC_TAKES)  # every write has ended
    assert live not in path.read_text() and not aside.exists()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


class HeldSync:
    """The first ``os.fsync`` waits in its thread until ``release``d (a disk busy for as
    long, or a worker stopped mid-write); the others go through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.holding = self.released = False
        real, sleep = os.fsync, monkey.get_original("time", "sleep")

        def fsync(fd: int) -> None:
            if not self.holding:
                self.holding = True
                while not self.released:
                    sleep(0.005)  # the thread's own: the loop goes on
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def release(self) -> None:
        self.released = True


# Another worker (a process of its own), which read a moment ago: it writes the keys
# it is given, as of then, and no model.
ANOTHER_WORKER = """
import json, sys
from pathlib import Path
from gateway.auth import keys
from gateway.models import utcnow
from gateway.snapshot import refresher
keys.load(json.loads(sys.stdin.read()))
refresher.path, refresher._read_at = Path(sys.argv[1]), utcnow()
refresher._write()
print(refresher._read_at.isoformat())
"""


def another_worker_writes(path: Path, rows: list[list]) -> str:
    """Another worker, which read a moment ago (``rows``: its keys), writes the file;
    when it read."""
    done = subprocess.run(
        [sys.executable, "-c", ANOTHER_WORKER, str(path)],
        input=json.dumps(rows),
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    read_at = done.stdout.strip()
    assert json.loads(path.read_text())["read_at"] == read_at, done.stderr
    return read_at


def test_an_older_read_s_write_never_lands_over_a_newer_one(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker's write of a read waits for the disk (busy, or the worker stopped)
    while another's of a later read lands. The last rename won: the file went back to
    the older read, and the other workers recalled it during an outage, not what only
    the later one knew (a model made just before: 404)."""
    path = tmp_path / "snapshot.json"
    held = HeldSync(monkeypatch)
    refresher._written = None  # as after a read that changed something
    writing = gevent.spawn(refresher._write)
    wait_until(lambda: held.holding, interval=0.01)
    theirs = another_worker_writes(path, keys.dump())
    held.release()
    writing.get(timeout=5)
    assert json.loads(path.read_text())["read_at"] == theirs
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.glob(".snapshot.json.*[0-9]")] == [], "nothing left aside"


def test_a_revocation_takes_the_key_out_of_a_file_of_a_later_read(
    world: dict, tmp_path: Path
) -> None:
    """A worker hears a revocation after another worker, which read later but before the
    revocation, wrote the file: the key is taken out of that file (a worker started in
    an outage would serve it), and the rest of the later read stays."""
    path, live = tmp_path / "snapshot.json", ApiKey.hash(world["key"])
    theirs = another_worker_writes(path, [*keys.dump(), ["f" * 64, 999, 5, 5, None]])
    keys.changed(REVOKED + live)  # this worker's read is older than the file
    wait_until(lambda: live not in path.read_text(), timeout=3, interval=0.01)
    saved = json.loads(path.read_text())
    assert saved["read_at"] == theirs and [row[0] for row in saved["keys"]] == ["f" * 64]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.glob(".snapshot.json.*[0-9]")] == [], "nothing left aside"


def test_changes_made_elsewhere_apply_at_the_next_read(world: dict, tmp_path: Path) -> None:
    """Another worker or instance changes things: this one sees them within CACHE_TTL."""
    with database.connection_context():
        ApiKey.update(rpm_limit=99, updated_at=utcnow()).where(ApiKey.id == world["id"]).execute()
        expiring, expiring_key = ApiKey.issue()
        Model.create(provider=world["provider"], system_name="new", remote_id="n")
    assert keys.get(world["key"]).rpm_limit == 7  # until the next read
    assert refresher.refresh()
    assert keys.get(world["key"]).rpm_limit == 99
    assert catalog.lookup("new")
    with database.connection_context():
        ApiKey.update(expires_at=utcnow() - timedelta(seconds=1), updated_at=utcnow()).where(
            ApiKey.id == expiring.id
        ).execute()
        ApiKey.update(revoked=True, updated_at=utcnow()).where(ApiKey.id == world["id"]).execute()
        Model.update(deleted=True).where(Model.system_name == "new").execute()
    assert refresher.refresh()
    assert keys.get(world["key"]) is None
    assert not keys.get(expiring_key).usable(utcnow())
    with pytest.raises(NotFound):
        catalog.lookup("new")
    saved = json.loads((tmp_path / "snapshot.json").read_text())
    assert ApiKey.hash(world["key"]) not in {row[0] for row in saved["keys"]}


def test_a_key_or_model_made_a_moment_ago_elsewhere_waits_for_one_read(world: dict) -> None:
    reads = []
    real = ApiKey.changed_since

    def counted(since):  # type: ignore[no-untyped-def]
        reads.append(since)
        return real(since)

    with database.connection_context():
        _, new_key = ApiKey.issue()
        Model.create(provider=world["provider"], system_name="fresh", remote_id="f")
    ApiKey.changed_since = counted  # type: ignore[method-assign]
    try:
        assert keys.get(new_key) is not None
        assert catalog.lookup("fresh")
        assert len(reads) <= 2 and all(since is not None for since in reads), "not incremental"
        bad = "sk-" + "f" * 32
        assert keys.get(bad) is None
        count = len(reads)
        assert keys.get(bad) is None  # asked a moment ago: no second read
        assert len(reads) == count
    finally:
        ApiKey.changed_since = real  # type: ignore[method-assign]


def test_forget_wins_over_a_read_in_flight(world: dict) -> None:
    """A revocation in this worker lands while a refresh is reading: never undone."""
    real = ApiKey.changed_since

    def revoke_midway(since):  # type: ignore[no-untyped-def]
        rows = list(real(since))  # read before the revocation committed
        ApiKey.update(revoked=True, updated_at=utcnow()).where(ApiKey.id == world["id"]).execute()
        keys.forget(ApiKey.hash(world["key"]), revoked=True)
        return rows

    ApiKey.changed_since = revoke_midway  # type: ignore[method-assign]
    try:
        with database.connection_context():
            ApiKey.update(rpm_limit=8, updated_at=utcnow()).where(
                ApiKey.id == world["id"]
            ).execute()
        refresher.refresh()
    finally:
        ApiKey.changed_since = real  # type: ignore[method-assign]
    assert keys.get(world["key"]) is None


def test_a_changed_key_serves_as_it_was_until_read_and_a_revoked_one_not_at_all(
    world: dict, database_url: str
) -> None:
    """A change announced just before the database went away: the key is not refused as
    unknown (its last state serves until a read succeeds); a revocation is, at once."""
    digest = ApiKey.hash(world["key"])
    with away(unreachable(database_url)):
        keys.changed(digest)
        assert keys.get(world["key"]).rpm_limit == 7  # as it was: the read failed
        assert keys.get(world["key"]).rpm_limit == 7
        keys.changed(REVOKED + digest)
        assert keys.get(world["key"]) is None
        keys.changed(digest)  # and the hash after it, for a previous version's workers
        assert keys.get(world["key"]) is None
    db.mark_reachable(True)
    with database.connection_context():
        ApiKey.update(rpm_limit=8, updated_at=utcnow()).where(ApiKey.id == world["id"]).execute()
    keys.changed(digest)
    assert keys.get(world["key"]).rpm_limit == 8  # read again once the database answers


def another_worker_read_later(world: dict, tmp_path: Path) -> tuple[str, str]:
    """A key (rpm 9) and a model ("later") made after this worker's last read, read by
    another worker, which wrote the snapshot file: the key, and the file's text."""
    path = tmp_path / "snapshot.json"
    ours = path.read_text()
    with database.connection_context():
        _, later_key = ApiKey.issue(rpm_limit=9)
        Model.create(provider=world["provider"], system_name="later", remote_id="l")
    assert refresher.refresh()  # as the other worker does
    theirs = path.read_text()
    path.write_text(ours)
    assert refresher.load_file()  # this worker, as of its own read
    path.write_text(theirs)
    return later_key, theirs


def test_what_another_worker_read_later_is_served_while_the_database_is_away(
    world: dict, database_url: str, tmp_path: Path
) -> None:
    """A key or model made a moment before the database went away, which only another
    worker was asked for: that worker's read is in the snapshot file, and this one serves
    it while it cannot read (it refused them for the whole outage)."""
    later_key, _ = another_worker_read_later(world, tmp_path)
    with away(unreachable(database_url)):
        assert keys.get(later_key).rpm_limit == 9
        assert [c.remote_id for c in catalog.lookup("later")] == ["l"]
        assert keys.get(world["key"]).rpm_limit == 7  # what it knew stays
        assert keys.get(world["revoked"]) is None
    # Back: the database decides again. The key revoked meanwhile is refused.
    with database.connection_context():
        ApiKey.update(revoked=True, updated_at=utcnow()).where(
            ApiKey.key_hash == ApiKey.hash(later_key)
        ).execute()
    db.mark_reachable(True)
    assert refresher.refresh()
    assert keys.get(later_key) is None and keys.get(world["key"]).rpm_limit == 7


def test_a_key_revoked_since_or_a_file_no_later_than_this_worker_s_read_is_not_recalled(
    world: dict, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "snapshot.json"
    later_key, theirs = another_worker_read_later(world, tmp_path)
    keys.changed(REVOKED + ApiKey.hash(later_key))  # announced to this worker too
    # It rewrites the file from what it knows, beside the loop: as an announcement.
    wait_until(lambda: ApiKey.hash(later_key) not in path.read_text(), interval=0.01)
    path.write_text(theirs)  # heard after the other worker wrote
    with away(unreachable(database_url)):
        assert keys.get(later_key) is None
        assert catalog.lookup("later")  # the rest of that read serves
    # This worker reads (the key revoked, the model deleted): a file of an earlier read
    # holding them is older than what it knows; so, for all it can tell, is a file that
    # does not say when its read was (an earlier build's).
    with database.connection_context():
        ApiKey.update(revoked=True, updated_at=utcnow()).where(
            ApiKey.key_hash == ApiKey.hash(later_key)
        ).execute()
        Model.update(deleted=True).where(Model.system_name == "later").execute()
    db.mark_reachable(True)
    assert refresher.refresh()
    for text in (theirs, json.dumps({**json.loads(theirs), "read_at": None})):
        path.write_text(text)
        with away(unreachable(database_url)):
            with pytest.raises(NotFound):
                catalog.lookup("later")
            assert keys.get(later_key) is None  # (the second time: refused a moment ago)


def test_a_black_holed_database_stalls_no_request(world: dict) -> None:
    """A database that accepts connections and never answers (a dropped route, a hung
    server): the refresh gives up in DB_CONNECT_TIMEOUT, and no call waits longer
    than KEY_LOOKUP_WAIT even before that is known."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # the kernel completes connections; nobody ever answers
    try:
        black = open_database(f"postgresql://u@127.0.0.1:{hole.getsockname()[1]}/db", 2.0)
        with away(black):
            known, took = timed(keys.get, world["key"])
            assert known is not None and took < 0.05
            unknown, took = timed(keys.get, "sk-" + "1" * 32)
            assert unknown is None and 0.9 < took < 1.5  # KEY_LOOKUP_WAIT, then refused
            started = time.monotonic()
            while db.reachable() and time.monotonic() - started < 5:
                gevent.sleep(0.05)
            assert not db.reachable() and time.monotonic() - started < 3
            assert timed(keys.get, "sk-" + "2" * 32) < (None, 0.05)
    finally:
        hole.close()
