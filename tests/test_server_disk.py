"""The disk fills up under the embedded database: calls go on, and nothing is lost.

SQLite, the journal, the instance directory and the metrics' files share one disk (a
tmpfs of the test's own, so root), as on a single machine. Full, it refuses the
database's writes and the journal's appends alike: the records wait in the workers'
memory, and are written once there is room again; no worker dies of it (the metrics'
mapped files once killed one with SIGBUS: ``gateway/metric_files.py``). The same with
PostgreSQL down instead is in ``test_server_outage.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway.db import migrate, open_database
from tests.servers import Disk, Gateway, wait_until

pytestmark = pytest.mark.server

TEXT = "".join(f"tok{i} " for i in range(8))


def gauge(gw: Gateway, name: str) -> float:
    answer = requests.get(f"{gw.url}/metrics", timeout=5)
    assert answer.status_code == 200
    samples = (s for f in text_string_to_metric_families(answer.text) for s in f.samples)
    return sum(s.value for s in samples if s.name == name)


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
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
        workers = sorted(gw.worker_pids())
        disk.fill()

        texts = []
        for i in range(10):
            messages = [{"role": "user", "content": f"call-{i:03d} tell me a story"}]
            if i % 2:
                pieces = client.chat.completions.create(model="gpt", messages=messages, stream=True)
                texts.append("".join(c.choices[0].delta.content or "" for c in pieces if c.choices))
            else:
                answer = client.chat.completions.create(model="gpt", messages=messages)
                texts.append(answer.choices[0].message.content)
        assert texts == [TEXT] * 10, "the calls do not notice"

        wait_until(lambda: gauge(gw, "gateway_records_held") == 10, timeout=30, interval=0.5)
        time.sleep(3)
        assert gauge(gw, "gateway_records_held") == 10, "still nowhere to go"
        disk.free()
        wait_until(lambda: gauge(gw, "gateway_records_held") == 0, timeout=30, interval=0.5)

        def all_ten() -> list[dict] | None:
            rows = gw.records(limit=100)
            return rows if len(rows) >= 10 else None

        rows = wait_until(all_ten, timeout=60, interval=0.5)
        markers = sorted(json.dumps(r["prompt"]).split("call-", 1)[1][:3] for r in rows)
        assert markers == [f"{i:03d}" for i in range(10)], "each call exactly once"
        assert {(r["status"], r["completionTokens"]) for r in rows} == {("completed", 8)}
        assert gauge(gw, "gateway_records_lost_total") == 0
        assert sorted(gw.worker_pids()) == workers, "a worker died (SIGBUS?)"
        assert not list((disk.path / "journal").glob("torn-*")), "no half-written line"
    finally:
        gw.stop()
