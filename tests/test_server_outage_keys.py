"""Keys and models while the database is away: what the instance knew, it serves.

A key changed or revoked just before the database goes away, a key or a model one
worker read a moment before it, a gateway started (or a worker respawned) during the
outage from its snapshot file: every worker serves what the instance last knew, and
never a key revoked since (SPEC rule 8). Each test stops its own PostgreSQL cluster;
PostgreSQL only (SQLite cannot go away), run when GATEWAY_TEST_DATABASE_URL is set, as
in CI. The records of the calls made meanwhile: ``test_server_outage.py``.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import psycopg
import pytest
import requests

from tests.conftest import PG_URL
from tests.outage_support import KINDS, QUICK, by_call, call, final_records, gateway_database
from tests.servers import Gateway, PostgresCluster, free_port, wait_until

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not PG_URL, reason="PostgreSQL tests run with GATEWAY_TEST_DATABASE_URL"),
]


@pytest.fixture(autouse=True)
def _fresh_fake_log(fake) -> None:  # type: ignore[no-untyped-def]
    fake.reset()


def in_snapshot(instance: Path, *texts: str) -> bool:
    """The instance's snapshot file holds every text; a gateway key by its hash (the
    file holds no key itself). A model's read can write the file before its key's."""
    path = instance / "snapshot.json"
    if not path.exists():
        return False
    held = path.read_text()
    hashed = [hashlib.sha256(t.encode()).hexdigest() if t.startswith("sk-") else t for t in texts]
    return all(text in held for text in hashed)


# -- a gateway started while the database is down -------------------------------------


@pytest.fixture(params=["in-process", "redis"])
def announced(request: pytest.FixtureRequest) -> dict[str, str]:
    """How a key change reaches the worker that serves the key: in the worker that made
    it (one worker, no Redis), or over Redis (two workers: one makes it, both hear it)."""
    if request.param == "in-process":
        return {"workers": "1"}
    redis = request.getfixturevalue("shared_redis")
    return {"workers": "2", "REDIS_URL": redis.url, "GATEWAY_REDIS_PREFIX": f"out{free_port()}"}


def key_changed_then_database_gone(
    cluster: PostgresCluster,
    fake,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    announced: dict,
    change: str,
    respawned: bool = False,
) -> list[int]:
    """A key every worker knows is changed (``limits``) or revoked (``revoke``), and the
    database stops just after, before any worker read the key again: the statuses of
    calls made with it then (by new workers, once every worker was killed and
    respawned, if ``respawned``)."""
    url = gateway_database(cluster)
    env = {**QUICK, "GATEWAY_CACHE_TTL": "3600"}  # only the announcement makes one re-read
    gw = Gateway(url, tmp_path / "instance", workers=int(announced["workers"]), **env,
                 **{k: v for k, v in announced.items() if k != "workers"})  # fmt: skip
    try:
        key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=3")["key"]
        assert [chat_status(gw, key) for _ in range(6)] == [200] * 6  # known to every worker
        if change == "limits":
            gw.api("PUT", f"/apiKey/{key}/ratelimit", json={"rpmLimit": 500, "tpmLimit": 90000})
        else:
            gw.api("DELETE", f"/apiKey/{key}")
        cluster.stop()
        if respawned:
            old = gw.worker_pids()
            for pid in old:
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: len(set(gw.worker_pids()) - set(old)) == len(old), timeout=30)
            wait_until(lambda: requests.get(f"{gw.url}/healthz", timeout=5).ok, timeout=30)
        return [chat_status(gw, key) for _ in range(6)]
    finally:
        gw.stop()


def chat_status(gw: Gateway, key: str, model: str = "gpt") -> int:
    """The status of a chat call to ``model`` with ``key``, on a connection of its own."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    return requests.post(
        f"{gw.url}/v1/chat/completions", json=chat, headers=headers, timeout=30
    ).status_code


def test_a_key_changed_just_before_the_database_goes_away_keeps_working(
    cluster: PostgresCluster, fake, tmp_path: Path, announced: dict
) -> None:  # type: ignore[no-untyped-def]
    """Every worker forgets a changed key (its new limits apply at once); while its new
    state cannot be read, it is served as it was, not refused as unknown (SPEC rule 8:
    it was refused with 401 until CACHE_TTL after the database came back)."""
    got = key_changed_then_database_gone(cluster, fake, tmp_path, announced, "limits")
    assert got == [200] * 6


def test_a_key_revoked_just_before_the_database_goes_away_is_refused_at_once(
    cluster: PostgresCluster, fake, tmp_path: Path, announced: dict
) -> None:  # type: ignore[no-untyped-def]
    """A revoked key is never served from its last known state, database or not."""
    got = key_changed_then_database_gone(cluster, fake, tmp_path, announced, "revoke")
    assert got == [401] * 6


def test_a_key_revoked_just_before_the_database_goes_away_is_refused_by_a_new_worker(
    cluster: PostgresCluster, fake, tmp_path: Path, announced: dict
) -> None:  # type: ignore[no-untyped-def]
    """A worker that starts during the outage (a killed or recycled one respawned) serves
    the snapshot file: a revocation announced before must not be in it. It was: the file
    was only rewritten after a read, and the key was served for the whole outage."""
    got = key_changed_then_database_gone(cluster, fake, tmp_path, announced, "revoke", True)
    assert got == [401] * 6


@pytest.mark.parametrize("made", ["key and model", "model"])
def test_what_one_worker_read_before_an_outage_every_worker_serves(
    cluster: PostgresCluster, fake, tmp_path: Path, made: str
) -> None:  # type: ignore[no-untyped-def]
    """A key and a model (or a model alone) made a moment before the database goes away,
    used once: the worker that served the call read them, the other did not (CACHE_TTL
    is long). The instance knew them, so the other worker serves them too while the
    database is away (SPEC rule 8); it refused the key (401), or the model (404), for
    the whole outage."""
    url = gateway_database(cluster)
    env = {**QUICK, "GATEWAY_CACHE_TTL": "3600"}  # no worker reads again on its own
    gw = Gateway(url, tmp_path / "instance", workers=2, **env)
    stopped: list[int] = []

    def only(pid: int) -> None:
        """Only ``pid`` of the workers takes calls (the other is stopped), once it answers:
        it has started (its first read of keys and catalog is done)."""
        for other in stopped:
            os.kill(other, signal.SIGCONT)
        stopped[:] = [each for each in gw.worker_pids() if each != pid]
        for other in stopped:
            os.kill(other, signal.SIGSTOP)
        gw.admin.close()  # no kept-alive connection to a stopped worker
        wait_until(lambda: requests.get(f"{gw.url}/healthz", timeout=5).ok, timeout=30)

    try:
        reader, other = gw.worker_pids()
        only(other)  # started: nothing made after this is read by it
        if made == "model":
            route = gw.setup_route(fake.url, system_name="old", remote_id="fake;chunks=3")
            assert chat_status(gw, route["key"], "old") == 200  # the key: known to both
        only(reader)
        if made == "model":
            key = route["key"]
            gw.api("POST", "/models", json={"providerId": route["provider"]["id"],
                                             "systemName": "gpt", "remoteId": "fake;chunks=3"})  # fmt: skip
        else:
            key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=3")["key"]
        assert chat_status(gw, key) == 200  # the reader read them; it wrote the snapshot file
        wait_until(lambda: in_snapshot(tmp_path / "instance", "gpt", key))
        cluster.stop()
        only(other)
        assert [chat_status(gw, key) for _ in range(6)] == [200] * 6
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        gw.stop()


def test_a_gateway_started_while_the_database_is_down_serves_from_its_snapshot(
    cluster: PostgresCluster, fake, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A restart during an outage (a deploy, a container moved, a host rebooted): the
    master's ``prepare`` cannot migrate. With a snapshot this build wrote, the gateway
    starts, serves the keys and models it knew, journals its records and writes them
    once the database is back. Without one (a new instance) the start stops and says
    why; so does a server that answers and refuses (no such database), as before."""
    url = gateway_database(cluster)
    instance = tmp_path / "instance"
    gw = Gateway(url, instance, GATEWAY_CACHE_TTL="1")
    try:
        key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=12")["key"]
        gw.setup_route(
            fake.url, provider_type="anthropic", system_name="claude", remote_id="fake;chunks=12"
        )
        wait_until(lambda: in_snapshot(instance, '"gpt"', '"claude"', key), timeout=10)
    finally:
        gw.stop()

    cluster.stop()
    with pytest.raises(RuntimeError, match="the gateway cannot start without it") as refused:
        Gateway(url, tmp_path / "new-instance", GATEWAY_DB_CONNECT_TIMEOUT="2")
    assert "there is no" in str(refused.value) and "snapshot.json" in str(refused.value)

    gw = Gateway(url, instance, **QUICK)
    try:
        assert "serving the last known keys and models" in gw.log()
        kinds = [kind for kind in KINDS if not kind[3]]
        got = {f"call-{i:03d}": call(gw, key, f"call-{i:03d}", kinds[i % 4]) for i in range(8)}
        assert set(got.values()) == {"full"}, got
        journal = instance / "journal"
        wait_until(lambda: list(journal.glob("journal-*.jsonl")), timeout=30)
        cluster.start()
        rows = final_records(gw, 8)
        assert sorted(by_call(rows)) == sorted(got), "each call exactly once"
        assert {r["status"] for r in rows} == {"completed"}
        assert all(r["tokens"]["output"] for r in rows), "the upstream's own counts"
    finally:
        gw.stop()

    # A server that is there and refuses (a wrong database name): the start stops, even
    # with a snapshot of this build's beside it.
    with pytest.raises(RuntimeError, match="does not exist"):
        Gateway(cluster.url("no_such_database"), instance)

    # A server that hangs (its system takes the connection; nothing answers it) is down
    # too: a bare TCP connect took it for one that answers and refuses, and the start
    # stopped.
    with cluster.frozen():
        gw = Gateway(url, instance, **QUICK)
        try:
            assert "serving the last known keys and models" in gw.log()
            assert call(gw, key, "call-100", kinds[0]) == "full"
        finally:
            gw.stop()


def test_a_gateway_started_while_the_database_shuts_down_serves_from_its_snapshot(
    cluster: PostgresCluster, fake, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A server that answers only to say it takes no connections now (shutting down,
    starting up, recovering: SQLSTATE 57P03) is down, not a server that refuses: a
    gateway restarted then starts from its snapshot. It took the probe's answer for a
    refusal, and the start stopped (a restart beside a database restart, seen under
    chaos; a crash recovery keeps a server in that state for minutes)."""
    url = gateway_database(cluster)
    instance = tmp_path / "instance"
    gw = Gateway(url, instance)
    try:
        key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=12")["key"]
        wait_until(lambda: in_snapshot(instance, '"gpt"', key), timeout=10)
    finally:
        gw.stop()

    # A smart shutdown waits for its last client: meanwhile it refuses every new one.
    holder = psycopg.connect(url)
    cluster._run("pg_ctl", "-D", cluster.data, "-m", "smart", "-W", "stop")
    with pytest.raises(psycopg.OperationalError, match="shutting down"):
        wait_until(lambda: psycopg.connect(url, connect_timeout=2).close(), timeout=5)
    gw = Gateway(url, instance, **QUICK)
    try:
        assert "serving the last known keys and models" in gw.log()
        kinds = [kind for kind in KINDS if not kind[3] and kind[1] == "gpt"]
        got = {f"call-{i:03d}": call(gw, key, f"call-{i:03d}", kinds[i % 2]) for i in range(4)}
        assert set(got.values()) == {"full"}, got
        holder.close()  # the shutdown ends; the server comes back
        wait_until(lambda: not (cluster.data / "postmaster.pid").exists(), timeout=10)
        cluster.start()
        rows = final_records(gw, 4)
        assert sorted(by_call(rows)) == sorted(got) and {r["status"] for r in rows} == {"completed"}
    finally:
        holder.close()
        gw.stop()
