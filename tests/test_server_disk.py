"""The disk fills up under the embedded database: calls go on, and nothing is lost.

SQLite, the journal, the instance directory and the metrics' files share one disk (a
tmpfs of the test's own, so root), as on a single machine. Full, it refuses the
database's writes and the journal's appends alike: the records wait in the workers'
memory, and are written once there is room again; no worker dies of it (the metrics'
mapped files once killed one with SIGBUS: ``gateway/metric_files.py``). The same with
PostgreSQL down instead is in ``test_server_outage.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.db import migrate, open_database
from tests.servers import Disk, Gateway, marker, wait_until

pytestmark = pytest.mark.server

TEXT = "".join(f"tok{i} " for i in range(8))


def test_a_full_disk_under_sqlite_keeps_every_record_until_there_is_room(
    disk: Disk, fake, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{disk.path / 'gateway.db'}"
    migrate(handle := open_database(url))
    handle.close()
    gw = Gateway(
        url,
        tmp_path / "instance",
        workers=2,
        GATEWAY_JOURNAL_DIR=str(disk.path / "journal"),
        GATEWAY_INSTANCE_PATH=str(disk.path / "instance"),
        PROMETHEUS_MULTIPROC_DIR=str(disk.path / "metrics"),
        GATEWAY_CACHE_TTL="1",
    )
    try:
        key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=8")["key"]
        time.sleep(1.5)  # CACHE_TTL: every worker has read the key
        workers = sorted(gw.worker_pids())
        disk.fill()

        texts = gw.marked_calls(key, 10)
        assert texts == [TEXT] * 10, "the calls do not notice"

        wait_until(lambda: gw.metric("gateway_records_held") == 10, timeout=30, interval=0.5)
        time.sleep(3)
        assert gw.metric("gateway_records_held") == 10, "still nowhere to go"
        disk.free()
        wait_until(lambda: gw.metric("gateway_records_held") == 0, timeout=30, interval=0.5)

        def all_ten() -> list[dict] | None:
            rows = gw.records(limit=100)
            return rows if len(rows) >= 10 else None

        rows = wait_until(all_ten, timeout=60, interval=0.5)
        assert sorted(marker(r["prompt"]) for r in rows) == [f"{i:03d}" for i in range(10)], (
            "each call exactly once"
        )
        assert {(r["status"], r["completionTokens"]) for r in rows} == {("completed", 8)}
        assert gw.metric("gateway_records_lost_total") == 0
        assert sorted(gw.worker_pids()) == workers, "a worker died (SIGBUS?)"
        assert not list((disk.path / "journal").glob("torn-*")), "no half-written line"
    finally:
        gw.stop()
