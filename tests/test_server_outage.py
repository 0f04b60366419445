"""The database goes down under load: clients never notice, and nothing is lost (SPEC rule 8).

The test's own PostgreSQL cluster is stopped for ``GATEWAY_TEST_OUTAGE`` seconds (12 in
the suite; the proof in the closing note of issue 7 used 30) while streaming and
non-streaming calls, through the openai and anthropic SDKs, same-format and converted,
run through a real gunicorn with 2 workers; some clients hang up. Workers recycle
every few requests, so some start during the outage and serve from the snapshot file.
A key revoked before the outage stays refused. Then: every call recorded exactly once,
with the right status and the fake upstream's own token counts, within a minute of
the database's return, and keys are refreshed again (a new key works at once, a
revocation applies within CACHE_TTL). PostgreSQL only (SQLite cannot go away); it
runs when GATEWAY_TEST_DATABASE_URL is set, as in CI.

And the same outage while the journal's disk is full (a tmpfs of the test's own, so
root): records wait in memory until the database or the disk comes back. And every
worker killed with -9 during an outage, mid-stream: the workers that replace them
replay the dead ones' journals, and the sweeper finalises the streams they served.
And a server that stops answering, or locks a table: nothing waits on it for ever.
Keys and models served while the database is away: ``test_server_outage_keys.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import openai
import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway import db, records, serializers
from gateway.db import DatabaseTimeout, database, open_database
from gateway.models import Completion
from gateway.search import Search
from gateway.sweeper import SWEPT_ERROR
from tests.conftest import PG_URL
from tests.outage_support import (
    KINDS,
    QUICK,
    REPLAY,
    by_call,
    call,
    final_records,
    gateway_database,
    marker_in,
)
from tests.servers import Disk, Gateway, PostgresCluster, children, marker, wait_until

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not PG_URL, reason="PostgreSQL tests run with GATEWAY_TEST_DATABASE_URL"),
]

OUTAGE = float(os.environ.get("GATEWAY_TEST_OUTAGE", "12"))
SCRIPT = "fake;chunks=12;delay=0.1;first_delay=0.6"  # a stream takes 1.7 s, an answer 0.6 s
# The longest a call of the outage may take: a few seconds when both workers recycle
# at once (none takes calls until one has exited). Not the clients' own timeout (30 s):
# a call held that long still answered, and the test took 30 s longer unnoticed.
SLOW_CALL = 20.0
HUNG_UP = ("hung up", "hung up late")


@pytest.fixture(autouse=True)
def _fresh_fake_log(fake) -> None:  # type: ignore[no-untyped-def]
    fake.reset()


def sent_once(fake) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """The fake upstream's log by the call each request's prompt names, each call once."""
    sent: dict[str, dict] = {}
    for entry in fake.log():
        marker = marker_in(entry["body"])
        assert marker not in sent, "a call reached the upstream twice"
        sent[marker] = entry
    return sent


def scrape(gw: Gateway) -> dict[tuple[str, str | None], float]:
    """/metrics' samples by name and ``type`` label (a 200 answer, within 5 s)."""
    answer = requests.get(f"{gw.url}/metrics", timeout=5)
    assert answer.status_code == 200
    return {
        (s.name, s.labels.get("type")): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def catalog_gauges(gw: Gateway) -> tuple[float, ...]:
    """/metrics' usable keys, providers and chat models."""
    found = scrape(gw)
    names = ("nexusgate_active_api_keys", None), ("nexusgate_active_providers", None)
    return tuple(found.get(n) for n in (*names, ("nexusgate_active_models", "chat")))


def test_a_database_outage_under_load_loses_nothing_and_fails_no_call(
    cluster: PostgresCluster, fake, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    url = gateway_database(cluster)
    gw = Gateway(url, tmp_path / "instance", workers=2, GATEWAY_MAX_REQUESTS="14", **QUICK)
    try:
        run_the_outage(gw, cluster, fake)
    finally:
        gw.stop(timeout=20)  # 1.5-2.5 s: not a worker held until graceful_timeout (30 s)


def run_the_outage(gw: Gateway, cluster: PostgresCluster, fake) -> None:  # type: ignore[no-untyped-def]
    # 64 calls in 16 s: past the default RPM limit (50), which the workers share.
    roomy = {"rpmLimit": 1000}
    key = gw.setup_route(fake.url, system_name="gpt", remote_id=SCRIPT, key=roomy)["key"]
    gw.setup_route(fake.url, provider_type="anthropic", system_name="claude", remote_id=SCRIPT)
    revoked = gw.api("POST", "/apiKey", json={"comment": "revoked before the outage"})["key"]
    gw.api("DELETE", f"/apiKey/{revoked}")
    time.sleep(1.5)  # CACHE_TTL: every worker has read the revocation

    results: dict[str, tuple[tuple, str]] = {}
    took: dict[str, float] = {}
    refused: list[str] = []
    pool = gevent.pool.Pool()

    def client(i: int, delay: float) -> None:
        gevent.sleep(delay)
        kind = KINDS[i % len(KINDS)]
        marker = f"call-{i:03d}"
        began = time.monotonic()
        results[marker] = (kind, call(gw, key, marker, kind))
        took[marker] = time.monotonic() - began

    # 8 calls in the 2 s before the outage (some in flight when it starts), 4 a second
    # during it, 8 after it.
    during = int(OUTAGE * 4)
    schedule = [i * 0.25 for i in range(8)]
    schedule += [2.0 + i * 0.25 for i in range(during)]
    schedule += [2.0 + OUTAGE + 0.5 + i * 0.25 for i in range(8)]
    for i, delay in enumerate(schedule):
        pool.spawn(client, i, delay)
    for i in range(4):  # the revoked key, during the outage
        pool.spawn(
            lambda i=i: (
                gevent.sleep(3.0 + i),
                refused.append(call(gw, revoked, f"revoked-{i}", KINDS[0])),
            )
        )
    gevent.sleep(2.0)
    cluster.stop()
    down_at = time.monotonic()
    gevent.sleep(1.0)
    # The first scrapes ever, with the database away: counted from the workers' memory.
    catalogs = [catalog_gauges(gw) for _ in range(4)]
    gevent.sleep(OUTAGE - 1.0)
    cluster.start()
    back_at = time.monotonic()
    print(f"\noutage: {back_at - down_at:.1f} s")
    pool.join(timeout=60)

    # Clients: nothing failed because of the outage.
    outcomes = {m: got for m, (_, got) in results.items()}
    errors = {m: got for m, got in outcomes.items() if got not in ("full", *HUNG_UP)}
    assert len(results) == len(schedule) and not errors, errors
    slowest = max(took, key=took.__getitem__)
    print(f"the slowest call: {slowest}, {took[slowest]:.1f} s")
    assert took[slowest] < SLOW_CALL, (slowest, results[slowest], took[slowest])
    assert refused == ["HTTP 401"] * 4
    # Two usable keys (the revoked one is not), two providers, two chat models.
    assert catalogs == [(2, 2, 2)] * 4, catalogs

    # Records: each call exactly once, final, within a minute of the database's return.
    rows = final_records(gw, len(results))
    recovered = time.monotonic() - back_at
    print(f"all {len(rows)} records final {recovered:.1f} s after the database returned")
    by_marker = by_call(rows)
    assert sorted(by_marker) == sorted(results)
    sent = sent_once(fake)
    for mark, ((_sdk, _model, _stream, _hang_up), got) in results.items():
        (row,) = by_marker[mark]
        if got == "hung up late":  # it may have been answered in full: both are true
            assert row["status"] in ("aborted", "completed"), (mark, row)
        else:
            assert row["status"] == ("aborted" if got == "hung up" else "completed"), (mark, row)
        usage = sent[mark]["usage"]
        assert (row["promptTokens"], row["completionTokens"]) == (
            usage["input_tokens"],
            usage["output_tokens"],
        ), (mark, row)
    from_snapshot = gw.log().count("snapshot: database unreachable: serving")
    print(f"{len(results)} calls, {from_snapshot} workers started from the snapshot file")
    assert from_snapshot, "no worker was recycled during the outage"

    # Keys are read again: a new key works at once on every worker; a revocation
    # applies within CACHE_TTL.
    late = gw.api("POST", "/apiKey", json={"comment": "after the outage"})["key"]
    assert [call(gw, late, "late", KINDS[2]) for _ in range(4)] == ["full"] * 4
    gw.api("DELETE", f"/apiKey/{late}")
    time.sleep(1.5)
    assert [call(gw, late, "late", KINDS[2]) for _ in range(4)] == ["HTTP 401"] * 4


# -- the database down and the journal's disk full ------------------------------------


def test_with_the_database_down_and_the_journal_s_disk_full_calls_wait_in_memory(
    cluster: PostgresCluster, disk: Disk, fake, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Both places a record can go are gone: calls still answer, their records wait in
    the workers' memory, and reach the database whichever comes back first: the
    database (written straight to it), or the disk (journaled, then replayed). A disk
    turned read-only with a journal on it keeps nothing from the database."""
    url = gateway_database(cluster)
    gw = Gateway(
        url,
        tmp_path / "instance",
        workers=2,
        GATEWAY_JOURNAL_DIR=str(disk.path / "journal"),
        GATEWAY_CACHE_TTL="1",
        GATEWAY_DB_CONNECT_TIMEOUT="2",
        GATEWAY_DB_TIMEOUT="5",
        # This test's remount to read-only is refused while a file on the disk is open
        # for writing (the write-ahead file is); the kernel's errors=remount-ro is not.
        GATEWAY_RECORDER_AHEAD="false",
        **REPLAY,
    )
    try:
        key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=12")["key"]
        gw.setup_route(
            fake.url, provider_type="anthropic", system_name="claude", remote_id="fake;chunks=12"
        )
        time.sleep(1.5)  # CACHE_TTL: every worker has read the key
        kinds = [kind for kind in KINDS if not kind[3]]  # no hang-ups: 4 kinds
        markers: list[str] = []

        def calls(first: int) -> None:
            got = {}
            for i in range(first, first + 8):
                markers.append(marker := f"call-{i:03d}")
                got[marker] = call(gw, key, marker, kinds[i % len(kinds)])
            assert set(got.values()) == {"full"}, got

        def held() -> float:
            return scrape(gw).get(("gateway_records_held", None), 0.0)

        def journaled() -> float:
            return scrape(gw).get(("gateway_journal_depth", None), 0.0)

        # The database comes back first, the disk still full: written straight to it.
        disk.fill()
        cluster.stop()
        calls(0)
        wait_until(lambda: held() == 8, timeout=30, interval=0.5)
        time.sleep(3)
        assert (held(), journaled()) == (8, 0), "still held, still nowhere to go"
        cluster.start()
        wait_until(lambda: len(gw.records(limit=100)) == 8, timeout=60, interval=0.5)
        assert (held(), journaled()) == (0, 0)

        # The disk comes back first: journaled, then replayed once the database answers.
        cluster.stop()
        calls(8)
        wait_until(lambda: held() == 8, timeout=30, interval=0.5)
        disk.free()
        wait_until(lambda: (held(), journaled()) == (0, 8), timeout=30, interval=0.5)
        cluster.start()
        wait_until(lambda: len(gw.records(limit=100)) == 16, timeout=60, interval=0.5)

        # The disk turns read-only with a journal left on it, and the database comes
        # back: the calls the disk refused are written straight to it (they stayed held
        # for as long as the disk refused), the journal's once the disk is writable.
        cluster.stop()
        calls(16)
        wait_until(lambda: journaled() == 8, timeout=30, interval=0.5)
        disk.read_only()
        try:
            calls(24)
            wait_until(lambda: held() == 8, timeout=30, interval=0.5)
            cluster.start()
            wait_until(lambda: len(gw.records(limit=100)) == 24, timeout=60, interval=0.5)
            assert held() == 0
        finally:
            disk.read_only(False)
        wait_until(lambda: len(gw.records(limit=100)) == 32, timeout=60, interval=0.5)

        rows = gw.records(limit=100)
        found = sorted(marker(r["prompt"]) for r in rows)
        assert found == [m[5:] for m in markers], "each call exactly once"
        assert {r["status"] for r in rows} == {"completed"}
        sent = {marker(e["body"]): e["usage"] for e in fake.log()}
        for row in rows:
            usage = sent[marker(row["prompt"])]
            assert (row["promptTokens"], row["completionTokens"]) == (
                usage["input_tokens"],
                usage["output_tokens"],
            )
        assert scrape(gw).get(("gateway_records_lost_total", None), 0.0) == 0
        assert not list((disk.path / "journal").glob("torn-*")), "no half-written line"
    finally:
        gw.stop()


# -- a database that stops answering ---------------------------------------------------


def test_a_database_that_stops_answering_gets_503_from_the_admin_side_not_a_hang(
    cluster: PostgresCluster, fake, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Every PostgreSQL process stopped: the connections the worker's pool holds stay
    open and nothing answers on them. A request's statement waited there for ever (the
    admin API, the dashboard, /api/usage), holding its greenlet and a pooled
    connection; each now gives up after DB_REQUEST_TIMEOUT and answers 503. Calls go on,
    and once the server answers again so does the admin API."""
    url = gateway_database(cluster)
    gw = Gateway(url, tmp_path / "instance", workers=1, GATEWAY_DB_REQUEST_TIMEOUT="1", **QUICK)
    try:
        key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=12")["key"]
        auth = {"Authorization": f"Bearer {key}"}
        asks = {
            "admin": lambda: gw.admin.get(f"{gw.url}/api/admin/completions", timeout=15),
            "usage": lambda: requests.get(f"{gw.url}/api/usage", headers=auth, timeout=15),
            "dashboard": lambda: requests.get(f"{gw.url}/login", timeout=15),
        }
        assert {name: ask().status_code for name, ask in asks.items()} == dict.fromkeys(asks, 200)
        with cluster.hung():
            for name, ask in asks.items():
                sent = time.monotonic()
                answer = ask()
                assert answer.status_code == 503, name
                assert time.monotonic() - sent < 5, name  # the bound, not DB_TIMEOUT or more
            assert answer.headers["Retry-After"] == "5"
            assert call(gw, key, "call-hung", KINDS[0]) == "full"
        wait_until(lambda: asks["admin"]().status_code == 200, timeout=20)
        assert len(final_records(gw, 1)) == 1  # the call's record, once the server answers
    finally:
        gw.stop()


@contextlib.contextmanager
def _bounded_pool(url: str) -> Iterator[Any]:
    """``database`` on a pool of its own for ``url``, each step of a request's use of it
    bounded by 1 s (``db.bounded``); as it was before, after."""
    previous, bound = database.obj, db._request_timeout
    database.initialize(handle := open_database(url))
    db._request_timeout = 1.0
    try:
        yield handle
    finally:
        handle.close_all()
        database.initialize(previous)
        db._request_timeout = bound


def test_a_transaction_open_when_the_database_stops_answering_is_bounded_at_its_commit(
    cluster: PostgresCluster,
) -> None:
    """peewee sends BEGIN, COMMIT and ROLLBACK on a cursor of its own, not through
    ``execute_sql``: a request whose transaction was open when every process stopped (a
    listing's, an admin write's) waited at its COMMIT until the server answered again,
    holding its greenlet and a pooled connection. The next request finds a usable one."""
    with _bounded_pool(cluster.url()):
        with contextlib.ExitStack() as resume:

            def transaction() -> None:
                with db.bounded(), db.connection(), database.atomic():
                    database.execute_sql("SELECT 1")
                    resume.enter_context(cluster.hung())

            sent = time.monotonic()
            request = gevent.spawn(transaction)
            request.join(timeout=10)
            assert request.ready(), "the COMMIT waited for the hung server"
            assert isinstance(request.exception, DatabaseTimeout)
            assert time.monotonic() - sent < 5
        with db.bounded(), db.connection():
            assert database.execute_sql("SELECT 2").fetchone() == (2,)


def test_a_statement_unanswered_inside_a_transaction_closes_its_connection_at_once(
    cluster: PostgresCluster,
) -> None:
    """A statement cut short inside ``atomic()``: its connection, mid-query, leaves the
    pool and is closed there and then. peewee refuses to close a connection inside a
    transaction, so it stayed open to the server until the transaction's end, or, were
    that never reached, until the garbage collector found it."""
    closed = []
    with _bounded_pool(cluster.url()) as handle:
        with contextlib.ExitStack() as resume:

            def transaction() -> None:
                with db.bounded(), db.connection(), database.atomic():
                    database.execute_sql("SELECT 1")
                    conn = database.connection()
                    resume.enter_context(cluster.hung())
                    try:
                        database.execute_sql("SELECT 2")
                    finally:
                        closed.append(conn.closed)
                        assert not handle._in_use and not handle._connections

            def request() -> None:
                try:
                    transaction()
                finally:  # and peewee let go of it once the transaction ended
                    closed.append(database.is_closed())

            asked = gevent.spawn(request)
            asked.join(timeout=10)
            assert isinstance(asked.exception, DatabaseTimeout), asked.exception
            assert closed == [True, True], "left open to the server"
        with db.bounded(), db.connection():
            assert database.execute_sql("SELECT 3").fetchone() == (3,)


def test_a_pooled_connection_whose_check_goes_unanswered_is_closed(
    cluster: PostgresCluster,
) -> None:
    """Taking a connection checks a pooled one (``SELECT 1``) after taking it off the
    pool: unanswered within the bound, it is closed, not left open to the server."""
    with _bounded_pool(cluster.url()) as handle:
        with db.connection():
            database.execute_sql("SELECT 1")
        [(_, _, pooled)] = handle._connections

        def request() -> None:
            with db.bounded(), db.connection():
                database.execute_sql("SELECT 1")

        with cluster.hung():
            asked = gevent.spawn(request)
            asked.join(timeout=10)
            assert isinstance(asked.exception, DatabaseTimeout)
            assert pooled.closed


def test_a_download_whose_database_stops_answering_is_bounded_too(
    cluster: PostgresCluster,
) -> None:
    """A download's batches are read while its answer streams, after the view (and its
    bound) returned: a server that stopped answering held it until it answered again."""
    with _bounded_pool(gateway_database(cluster)):
        batches = records.download(Completion, Search(), serializers.completion, True)
        with db.connection():  # pooled, as a worker's are (the migration's backends gone)
            assert database.execute_sql("SELECT 1").fetchone() == (1,)
        with cluster.hung():
            sent = time.monotonic()
            reading = gevent.spawn(next, batches, None)
            reading.join(timeout=10)
            waited = time.monotonic() - sent
        reading.join()  # once the server answers, at the latest
        assert waited < 5, "the download waited for the hung server"
        assert isinstance(reading.exception, DatabaseTimeout)


# -- the database answers but takes no writes ------------------------------------------


def test_a_database_that_takes_no_writes_is_an_outage_for_the_records(
    cluster: PostgresCluster, fake, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A standby after a failover, or a primary an operator (or a managed service short
    of disk) set read-only: reads work, every write is refused as a read-only
    transaction. That is the server's state, not the rows' fault: the records are
    journaled and written once it takes writes again, none set aside as refused; the
    admin API's writes get its 503."""
    url = gateway_database(cluster)
    admin = open_database(cluster.url())
    gw = Gateway(url, tmp_path / "instance", workers=2, GATEWAY_CACHE_TTL="1", **REPLAY)
    try:
        key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=12")["key"]
        gw.setup_route(
            fake.url, provider_type="anthropic", system_name="claude", remote_id="fake;chunks=12"
        )
        time.sleep(1.5)  # CACHE_TTL: every worker has read the key

        def read_only(on: bool) -> None:
            with admin.connection_context():
                admin.execute_sql("SET default_transaction_read_only = off")
                value = "on" if on else "DEFAULT"
                admin.execute_sql(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
                admin.execute_sql("SELECT pg_reload_conf()")

        read_only(True)
        kinds = [kind for kind in KINDS if not kind[3]]
        got = {f"call-{i:03d}": call(gw, key, f"call-{i:03d}", kinds[i % 4]) for i in range(8)}
        assert set(got.values()) == {"full"}, got
        journal = tmp_path / "instance" / "journal"
        wait_until(lambda: len(list(journal.glob("journal-*.jsonl"))), timeout=30)
        made = gw.admin.post(f"{gw.url}/api/admin/apiKey", json={"comment": "x"}, timeout=10)
        assert made.status_code == 503, made.text  # a write the admin API cannot make
        read_only(False)

        def all_eight() -> list[dict] | None:
            rows = gw.records(limit=100)
            return rows if len(rows) >= 8 else None

        rows = wait_until(all_eight, timeout=60, interval=0.5)
        found = sorted(marker(r["prompt"]) for r in rows)
        assert found == [f"{i:03d}" for i in range(8)], "each call exactly once"
        assert {r["status"] for r in rows} == {"completed"}
        assert not list(journal.glob("refused-*")), "set aside as if the rows were at fault"
    finally:
        gw.stop()
        admin.close_all()


# -- workers killed while the database is down -----------------------------------------


def test_workers_killed_during_an_outage_lose_nothing_they_journaled(
    cluster: PostgresCluster, fake, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """SPEC rules 7 and 8 at once. With the database down, every worker is killed with
    -9 while two long streams run on them: what the dead workers journaled (finished
    calls, and the streams' pending rows) reaches the database once it is back, replayed
    by the workers that replaced them; each call is recorded exactly once, and the two
    streams, whose final rows died with their workers, are finalised by the sweeper,
    never left pending."""
    url = gateway_database(cluster)
    gw = Gateway(url, tmp_path / "instance", workers=2, **QUICK)
    journal = tmp_path / "instance" / "journal"
    try:
        key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=12")["key"]
        doomed = "fake;chunks=400;delay=0.05"  # 20 s: mid-way when its worker dies
        doomed_key = gw.setup_route(fake.url, system_name="doomed", remote_id=doomed)["key"]
        time.sleep(1.5)  # CACHE_TTL: every worker has read both keys
        first_workers = set(children(gw.proc.pid))

        cluster.stop()
        kinds = [kind for kind in KINDS if not kind[3] and kind[1] == "gpt"]  # both SDKs
        markers = [f"call-{i:03d}" for i in range(12)]
        got = {m: call(gw, key, m, kinds[i % len(kinds)]) for i, m in enumerate(markers)}
        assert set(got.values()) == {"full"}, got
        streams = [doomed_stream(gw, doomed_key, f"call-{i:03d}") for i in (100, 101)]
        for reader in streams:
            assert reader.first.wait(timeout=10), "the doomed stream never began"

        def journaled() -> str:
            return "".join(p.read_text() for p in journal.glob("journal-*.jsonl"))

        everything = [*markers, "call-100", "call-101"]
        wait_until(lambda: all(m in journaled() for m in everything), timeout=30, interval=0.5)
        for pid in first_workers:
            os.kill(pid, signal.SIGKILL)
        for reader in streams:
            assert isinstance(reader.get(timeout=10), openai.APIError), "its worker died"
        # The master replaces them, during the outage (they serve from the snapshot).
        wait_until(lambda: len(set(children(gw.proc.pid)) - first_workers) == 2, timeout=30)
        cluster.start()
        rows = final_records(gw, len(everything))
        by_marker = by_call(rows)
        assert sorted(by_marker) == everything
        sent = sent_once(fake)
        for marker in markers:
            (row,) = by_marker[marker]
            usage = sent[marker]["usage"]
            assert (row["status"], row["promptTokens"], row["completionTokens"]) == (
                "completed",
                usage["input_tokens"],
                usage["output_tokens"],
            ), (marker, row)
        for marker in ("call-100", "call-101"):
            (row,) = by_marker[marker]
            assert (row["status"], row["error"], row["swept"]) == ("failed", SWEPT_ERROR, True)
        wait_until(lambda: not list(journal.glob("journal-*.jsonl")), timeout=30)
        assert not list(journal.glob("replaying-*")), "a claim left behind"
        assert not list(journal.glob("torn-*")) and not list(journal.glob("refused-*"))
    finally:
        gw.stop()


class DoomedStream(gevent.Greenlet):
    """A streamed call read in the background; ``first`` is set at its first piece."""

    def __init__(self, gw: Gateway, key: str, marker: str) -> None:
        super().__init__()
        self.gw, self.key, self.marker = gw, key, marker
        self.first = gevent.event.Event()

    def _run(self) -> str | openai.APIError:
        client = openai.OpenAI(base_url=f"{self.gw.url}/v1", api_key=self.key, max_retries=0)
        messages = [{"role": "user", "content": f"{self.marker} tell me a story"}]
        try:
            text = ""
            chunks = client.chat.completions.create(model="doomed", messages=messages, stream=True)
            for chunk in chunks:
                self.first.set()
                text += "".join(c.delta.content or "" for c in chunk.choices)
            return text
        except openai.APIError as exc:
            return exc


def doomed_stream(gw: Gateway, key: str, marker: str) -> DoomedStream:
    reader = DoomedStream(gw, key, marker)
    reader.start()
    return reader


# -- a table locked for longer than the jobs wait -------------------------------------


def test_a_locked_table_does_not_pile_up_the_gateway_s_connections(
    cluster: PostgresCluster, fake, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A job gives up after DB_TIMEOUT and drops its connection; the server did not
    notice while the statement waited for a lock (VACUUM FULL, ALTER TABLE), so each
    retry left one more waiting, until PostgreSQL refused every client. Its statements
    are now aborted by the server after DB_TIMEOUT too."""
    url = gateway_database(cluster)
    gw = Gateway(url, tmp_path / "instance", workers=2, GATEWAY_DB_TIMEOUT="2", **REPLAY)
    watch = psycopg.connect(url, autocommit=True)
    locker = psycopg.connect(url)
    try:
        key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=3")["key"]
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
        locker.execute("LOCK TABLE completions IN ACCESS EXCLUSIVE MODE")
        waiting = []
        for i in range(40):  # 20 s
            client.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": f"call {i}"}]
            )
            time.sleep(0.5)
            (count,) = watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND pid <> pg_backend_pid()"
            ).fetchone()
            waiting.append(count)
        locker.rollback()
        # Bounded by the jobs that can wait at once: before, one more every 2 s (10 by
        # the end of these 20 s, 47 after 60 s at the default DB_TIMEOUT).
        assert max(waiting[-10:]) <= 6, waiting
        wait_until(lambda: len(gw.records(limit=100)) == 40, timeout=60, interval=0.5)
    finally:
        locker.close()
        watch.close()
        gw.stop()
