"""The command line: ``flask --app wsgi <command>`` through the app's test CLI runner."""

from __future__ import annotations

import peewee

from gateway.callrows import snapshot
from gateway.db import database, migrate
from gateway.exchange import Exchange
from gateway.models import ApiKey, Completion
from gateway.recorder import recorder


def test_create_key_prints_a_key_that_authenticates(db, client, runner) -> None:  # type: ignore[no-untyped-def]
    done = runner.invoke(args=["create-key", "--comment", "batch job"])
    assert done.exit_code == 0, done.output
    key = done.output.strip()
    row = ApiKey.by_key(key)
    assert row is not None and row.comment == "batch job" and row.source == "manual"
    assert (row.rpm_limit, row.tpm_limit) == (50, 50000)
    answer = client.get("/api/usage", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.get_data(as_text=True)


def test_create_key_checks_the_comment_as_the_admin_api_does(db, runner) -> None:  # type: ignore[no-untyped-def]
    for comment in ("x" * 5000, "nul\x00inside"):
        done = runner.invoke(args=["create-key", "--comment", comment])
        assert done.exit_code != 0 and "comment" in done.output, done.output
    assert ApiKey.select().count() == 0


def completions() -> list[str]:
    with database.connection_context():
        return sorted(c.uid for c in Completion.select())


def test_replay_refused_writes_what_can_be_written_and_says_what_cannot(app, runner) -> None:  # type: ignore[no-untyped-def]
    """Rows the database refused (their key was missing) wait in the journal's refused
    files; once the key is there, the command writes them. Exit 1 while some are still
    refused, naming where they are."""
    calls = {key: Exchange(api_key_id=key, model="m", api_format="openai-chat") for key in (7, 8)}
    for ex in calls.values():
        ex.finish("completed")
        recorder.journal.append([snapshot(ex)], prefix="refused")
    with database.connection_context():
        ApiKey.create(id=7, key_hash="7" * 64, key_hint="sk-…7")
    done = runner.invoke(args=["replay-refused"])
    assert done.exit_code == 1, done.output
    assert f"in {recorder.journal.directory}, now written: 1" in done.output
    assert "refused again: 1" in done.output
    assert str(recorder.journal.own_path("refused")) in done.output
    assert completions() == [calls[7].uid]
    with database.connection_context():
        ApiKey.create(id=8, key_hash="8" * 64, key_hint="sk-…8")
    done = runner.invoke(args=["replay-refused"])
    assert done.exit_code == 0 and "now written: 1" in done.output, done.output
    assert completions() == sorted(ex.uid for ex in calls.values())
    assert not list(recorder.journal.directory.glob("refused-*"))


def test_prepare_migrates_again_when_the_database_answers_after_failing(
    app, runner, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A migration that could not reach PostgreSQL (a connect timeout: it was hung, or
    still starting) and a server that answers the probe a moment later: it came back
    meanwhile, and the start goes on. The first error was re-raised as a refusal and the
    start stopped (seen under chaos: a server resumed during the probe)."""
    tries = []

    def back_after_one_try():  # type: ignore[no-untyped-def]
        tries.append(1)
        if len(tries) == 1:
            raise peewee.OperationalError("connection timeout expired")
        return migrate()

    monkeypatch.setattr("gateway.db.migrate", back_after_one_try)
    monkeypatch.setattr("gateway.db.is_postgres", lambda: True)
    monkeypatch.setattr("gateway.pgprobe.server_answers", lambda: True)
    with app.app_context():  # as `flask --app wsgi prepare` runs it
        done = runner.invoke(args=["prepare"])
    assert done.exit_code == 0, done.output
    assert len(tries) == 2 and "serving the last known" not in done.output

    # A server that answers and refuses still stops the start, with its own error.
    def refused():  # type: ignore[no-untyped-def]
        raise peewee.OperationalError('database "nope" does not exist')

    monkeypatch.setattr("gateway.db.migrate", refused)
    with app.app_context():
        done = runner.invoke(args=["prepare"])
    assert done.exit_code != 0 and "does not exist" in str(done.exception)
