"""The command line: ``flask --app wsgi <command>`` through the app's test CLI runner."""

from __future__ import annotations

from gateway.models import ApiKey


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
