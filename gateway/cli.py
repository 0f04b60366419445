"""Command-line tasks: ``flask --app wsgi <command>``.

``prepare`` is what gunicorn's master runs (in a subprocess, so that peewee is never
imported in the master) before it forks workers: apply migrations, apply the init
file (``GATEWAY_INIT_FILE``), make sure an admin secret exists, and say where things are.
If the PostgreSQL server does not answer at all (an outage: the gateway restarted while
the database is down), the gateway starts anyway when its snapshot of keys and models
was written by a build with the same migrations (SPEC rule 8: calls go on, records go
to the journal); the rest waits for a start with the database. A server that answers
is asked once more (it may have come back meanwhile): if it refuses again (a wrong
password, no such database), that stops the start, as any other error.

``replay-refused`` offers the rows the database refused, set aside by the recorder, to
it again (``replay_refused``), each through the recorder's own ``write_rows``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import click
from flask import Flask, current_app

from gateway import auth, db, initfile, pgprobe, recorder, registry, snapshot
from gateway.db import UNREACHABLE
from gateway.journal import Journal
from gateway.vault import vault

log = logging.getLogger(__name__)


@click.command("migrate")
def migrate_command() -> None:
    """Apply pending database migrations."""
    applied = db.migrate()
    click.echo(f"applied: {', '.join(applied)}" if applied else "database is up to date")


@click.command("prepare")
@click.option("--url", default=None, help="Where the gateway will listen, for the banner.")
def prepare_command(url: str | None) -> None:
    """Migrate, ensure an admin secret, and print where the gateway is."""
    try:
        applied = db.migrate()
    except db.UNREACHABLE as exc:
        if not db.is_postgres():
            raise
        if not pgprobe.server_answers():
            _start_without_database(exc)
            return
        # It answers now: either it refuses (the same error again stops the start), or
        # it came back while this was looking (resumed, done starting up): go on.
        applied = db.migrate()
    if applied:
        click.echo(f"gateway: applied migrations {', '.join(applied)}")
    configured = bool(current_app.config.get("ADMIN_SUPER_SECRET"))
    with db.database.connection_context():
        if current_app.config.get("INIT_FILE"):
            _apply_init_file(Path(current_app.config["INIT_FILE"]))
        secret = auth.admin_secret(current_app)
        unreadable = registry.unreadable_provider_keys()
    if url:
        click.echo(f"gateway: public API   {url}/v1  (OpenAI and Anthropic formats)")
        click.echo(f"gateway: admin API    {url}/api/admin  (Authorization: Bearer <admin secret>)")
        click.echo(f"gateway: dashboard    {url}/")
    if configured:
        click.echo("gateway: admin secret from ADMIN_SUPER_SECRET")
    else:
        click.echo(f"gateway: admin secret (generated, kept in the settings table): {secret}")
        click.echo("gateway: set ADMIN_SUPER_SECRET to choose your own")
    _encryption_banner(unreadable)


def _start_without_database(exc: Exception) -> None:
    """The database is away: start from the snapshot, or stop the start saying why."""
    usable, what = snapshot.refresher.usable()
    if not usable:
        raise click.ClickException(
            f"the database does not answer ({exc}), and {what}: the gateway cannot start without it"
        )
    click.echo(f"gateway: WARNING: the database does not answer ({exc})")
    click.echo(
        f"gateway: WARNING: serving the last known keys and models, from {what}; "
        "records go to the journal until the database answers"
    )
    click.echo(
        "gateway: WARNING: migrations, the init file and a generated admin secret wait "
        "for a start with the database"
    )


@click.command("init-file")
@click.argument("path", type=click.Path(path_type=Path))
def init_file_command(path: Path) -> None:
    """Apply an init file (providers, models, keys) now, as GATEWAY_INIT_FILE at start."""
    with db.database.connection_context():
        _apply_init_file(path)


def _apply_init_file(path: Path) -> None:
    """Apply the file; an error stops the start (and applies nothing)."""
    try:
        outcome = initfile.apply(initfile.load(path))
    except initfile.InitFileError as exc:
        raise click.ClickException(f"init file: {exc}") from exc
    click.echo(f"gateway: init file {path}: {outcome.summary()}")
    for comment, key in outcome.new_keys.items():
        click.echo(f"gateway: init file: key '{comment}' created (shown only now): {key}")


def _encryption_banner(unreadable: list[int]) -> None:
    """Say where the encryption keys come from, and warn where they will not do."""
    if vault.source == "GATEWAY_ENCRYPTION_KEYS":
        click.echo("gateway: provider keys encrypted with GATEWAY_ENCRYPTION_KEYS")
    else:
        made = "generated now, " if vault.generated else ""
        click.echo(
            f"gateway: provider keys encrypted with the key in {vault.source} ({made}mode 0600)"
        )
        click.echo(
            "gateway: WARNING: every instance sharing this database needs that same key: "
            "set GATEWAY_ENCRYPTION_KEYS (see README, Security)"
        )
    if unreadable:
        click.echo(
            f"gateway: WARNING: the keys of providers {unreadable} cannot be decrypted with "
            "these encryption keys; those providers are called without a key"
        )


@click.command("rotate-keys")
def rotate_keys_command() -> None:
    """Encrypt every provider API key with the newest key in GATEWAY_ENCRYPTION_KEYS."""
    with db.database.connection_context():
        sealed, unreadable = registry.reseal_provider_keys()
    click.echo(f"sealed {sealed} provider keys with the newest encryption key")
    if unreadable:
        raise click.ClickException(f"cannot decrypt the keys of providers {unreadable}")


@click.command("create-key")
@click.option("--comment", default=None)
def create_key_command(comment: str | None) -> None:
    """Create a gateway API key and print it (shown only this once)."""
    body = {} if comment is None else {"comment": comment}
    try:
        # Through the registry, as the admin API and the dashboard create keys: the
        # same checks (a comment the database would refuse is an error, not a trace).
        with db.database.connection_context():
            _, key = registry.issue_key(registry.key_fields(body))
    except registry.Refused as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(key)


@dataclass
class Replayed:
    """What ``replay_refused`` did: rows written, rows refused again, and the error that
    stopped it (the database went away) if one did."""

    written: int = 0
    refused: int = 0
    stopped: Exception | None = None


def replay_refused(journal: Journal) -> Replayed:
    """Offer every row set aside as refused, any process's, to the database again, one
    by one: an operator's command, once what they were refused for is fixed (a
    constraint, a schema an old instance did not know, a bug). A row refused again is
    set aside again, in this process's file; if the database stops answering, so are
    the rows not tried yet. Rows already written, or overtaken by a newer snapshot,
    change nothing (``upsert_records``).
    """
    done = Replayed()

    def write(rows: list[dict]) -> None:
        if done.stopped is not None:  # the database is away: untried, kept as they were
            journal.append(rows, prefix="refused")
            return
        for i, row in enumerate(rows):
            try:
                recorder.write_rows([row])
            except UNREACHABLE as exc:
                db.discard_connection()
                done.stopped = exc
                journal.append(rows[i:], prefix="refused")
                return
            except Exception:
                db.discard_connection()  # a failed statement may leave it unusable
                log.exception("recorder: record %s refused again", row.get("uid"))
                journal.append([row], prefix="refused")
                done.refused += 1
            else:
                done.written += 1

    try:
        journal.replay(write, prefix="refused")
    finally:
        db.discard_connection()  # not in a connection_context: a failure closes it
    return done


@click.command("replay-refused")
def replay_refused_command() -> None:
    """Write the records the database refused (journal refused-*.jsonl files) again."""
    journal = recorder.recorder.journal
    done = replay_refused(journal)
    # Where it looked: run on another host, or with other settings, it finds nothing.
    click.echo(f"records set aside as refused in {journal.directory}, now written: {done.written}")
    if done.refused:
        click.echo(
            f"refused again: {done.refused}, set aside in "
            f"{journal.own_path('refused')} (the log says why)"
        )
    if done.stopped is not None:
        raise click.ClickException(
            f"the database stopped answering ({done.stopped}); the rest stay set aside"
        )
    if done.refused:
        raise SystemExit(1)


def init_app(app: Flask) -> None:
    """Register the commands."""
    for command in (
        migrate_command,
        prepare_command,
        create_key_command,
        rotate_keys_command,
        init_file_command,
        replay_refused_command,
    ):
        app.cli.add_command(command)
