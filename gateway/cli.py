"""Command-line tasks: ``flask --app wsgi <command>``.

``prepare`` is what gunicorn's master runs (in a subprocess, so that peewee is never
imported in the master) before it forks workers: apply migrations, make sure an
admin secret exists, and say where things are.
"""

from __future__ import annotations

import click
from flask import Flask, current_app

from gateway import auth, db
from gateway.models import ApiKey


@click.command("migrate")
def migrate_command() -> None:
    """Apply pending database migrations."""
    applied = db.migrate()
    click.echo(f"applied: {', '.join(applied)}" if applied else "database is up to date")


@click.command("prepare")
@click.option("--url", default=None, help="Where the gateway will listen, for the banner.")
def prepare_command(url: str | None) -> None:
    """Migrate, ensure an admin secret, and print where the gateway is."""
    applied = db.migrate()
    if applied:
        click.echo(f"gateway: applied migrations {', '.join(applied)}")
    configured = bool(current_app.config.get("ADMIN_SUPER_SECRET"))
    with db.database.connection_context():
        secret = auth.admin_secret(current_app)
    if url:
        click.echo(f"gateway: public API   {url}/v1  (OpenAI and Anthropic formats)")
        click.echo(f"gateway: admin API    {url}/api/admin  (Authorization: Bearer <admin secret>)")
        click.echo(f"gateway: dashboard    {url}/")
    if configured:
        click.echo("gateway: admin secret from ADMIN_SUPER_SECRET")
    else:
        click.echo(f"gateway: admin secret (generated, kept in the settings table): {secret}")
        click.echo("gateway: set ADMIN_SUPER_SECRET to choose your own")


@click.command("create-key")
@click.option("--comment", default=None)
def create_key_command(comment: str | None) -> None:
    """Create a gateway API key and print it (shown only this once)."""
    with db.database.connection_context():
        _, key = ApiKey.issue(comment=comment)
    click.echo(key)


def init_app(app: Flask) -> None:
    """Register the commands."""
    for command in (migrate_command, prepare_command, create_key_command):
        app.cli.add_command(command)
