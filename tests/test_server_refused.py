"""Rows the database refuses are set aside, and written once the cause is fixed.

A real gunicorn with 2 workers on the test's database; the database then refuses every
record (a trigger, as a constraint the rows break or a schema an old instance does not
know would): the calls go on, their records are set aside in the journal's refused
files and counted. The trigger goes, and an operator runs ``flask --app wsgi
replay-refused`` beside the live gateway: every call is recorded once, in full.
On one backend (``ONE_BACKEND``), PostgreSQL when there is one: what the recorder does
with a refusal is proven on both by ``test_recorder.py`` and ``test_cli.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.db import open_database
from tests.conftest import QUICK
from tests.servers import Gateway, marker, wait_until

pytestmark = pytest.mark.server
ONE_BACKEND = True  # see tests/conftest.py

TEXT = "".join(f"tok{i} " for i in range(6))
REFUSE = {
    "sqlite": [
        f"CREATE TRIGGER refuse_{event} BEFORE {event} ON completions "
        "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        for event in ("INSERT", "UPDATE")
    ],
    "postgresql": [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'check_violation'; END $$",
        "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON completions "
        "FOR EACH ROW EXECUTE FUNCTION refuse()",
    ],
}
ALLOW = {
    "sqlite": ["DROP TRIGGER refuse_INSERT", "DROP TRIGGER refuse_UPDATE"],
    "postgresql": ["DROP TRIGGER refuse ON completions", "DROP FUNCTION refuse()"],
}


@pytest.fixture
def gw(module_database: tuple[str, Path]) -> Iterator[Gateway]:
    url, directory = module_database
    gateway = Gateway(url, directory / "instance", workers=2, GATEWAY_CACHE_TTL="1")
    yield gateway
    gateway.stop_behind(QUICK)


def test_refused_records_are_written_by_the_operators_replay(
    gw: Gateway, module_database: tuple[str, Path], fake
) -> None:  # type: ignore[no-untyped-def]
    database_url = module_database[0]
    backend = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    key = gw.setup_route(fake.url, system_name="gpt", remote_id="fake;chunks=6")["key"]
    time.sleep(1.5)  # CACHE_TTL: every worker has read the key
    handle = open_database(database_url)

    def run(statements: list[str]) -> None:
        with handle.connection_context():
            for sql in statements:
                handle.execute_sql(sql)

    run(REFUSE[backend])
    texts = gw.marked_calls(key, 6)
    assert texts == [TEXT] * 6, "the calls do not notice"
    wait_until(lambda: gw.metric("gateway_records_refused_total") >= 6, timeout=30)
    assert gw.records() == []

    early = gw.command("replay-refused")  # the cause is still there: nothing changes
    assert early.returncode == 1 and "now written: 0" in early.stdout, early
    assert "refused again: 6" in early.stdout, early.stdout

    run(ALLOW[backend])
    done = gw.command("replay-refused")
    assert done.returncode == 0 and "now written: 6" in done.stdout, done
    rows = gw.records()
    assert sorted(marker(r["prompt"]) for r in rows) == [f"{i:03d}" for i in range(6)], (
        "each call exactly once"
    )
    assert {(r["status"], r["completionTokens"]) for r in rows} == {("completed", 6)}
    journal = gw.log_path.parent / "journal"
    assert not list(journal.glob("refused-*")) and not list(journal.glob("replaying-*"))
    assert gw.metric("gateway_records_refused_total") == 6, (
        "the replay's rows are not counted twice"
    )
    handle.close()
