"""Upgrading a database keeps its rows: the account's migration on a database in use.

A database migrated up to the migration before the account's, with a key, a model and
call records in it, is migrated the rest of the way: every row is still there, the old
records have no cost (which is what they had), and the new columns take values.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import peewee
import pytest
from playhouse.migrations import Runner

from gateway.db import MIGRATIONS, open_database
from tests.conftest import BACKENDS, PG_URL, _pg_admin, _with_database

BEFORE = "0003_sealed_keys_and_sessions"  # the latest migration before the account's


@pytest.fixture(params=BACKENDS)
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[peewee.Database]:
    """A database with no tables at all, on each backend."""
    if request.param == "sqlite":
        db = open_database(f"sqlite:///{tmp_path / 'old.db'}")
        yield db
        db.close()
        return
    name = f"gw_m_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin.connection_context():
        admin.execute_sql(f'CREATE DATABASE "{name}"')
    db = open_database(_with_database(PG_URL, name))
    yield db
    db.close_all()
    with admin.connection_context():
        admin.execute_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close_all()


def test_the_account_migration_keeps_every_row_and_adds_nullable_columns(
    empty_database: peewee.Database,
) -> None:
    db = empty_database
    with db.connection_context():
        runner = Runner(db, directory=str(MIGRATIONS))
        runner.up(target=BEFORE)
        db.execute_sql(
            "INSERT INTO api_keys (key_hash, key_hint, created_at, updated_at, revoked,"
            " rpm_limit, tpm_limit, source) VALUES ('h', 'sk-…1', '2026-01-01', '2026-01-01',"
            " false, 50, 50000, 'manual')"
        )
        db.execute_sql(
            "INSERT INTO providers (name, type, base_url, stream_usage, created_at, updated_at,"
            " deleted) VALUES ('p', 'openai', 'http://x', true, '2026-01-01', '2026-01-01', false)"
        )
        db.execute_sql(
            "INSERT INTO models (provider_id, system_name, model_type, input_price, output_price,"
            " weight, created_at, updated_at, deleted) VALUES (1, 'm', 'chat', 2.5, 10, 1,"
            " '2026-01-01', '2026-01-01', false)"
        )
        for n in range(3):
            db.execute_sql(
                "INSERT INTO completions (uid, api_key_id, model, api_format, stream, status,"
                " prompt_tokens, created_at, updated_at, swept, deleted) VALUES"
                f" ('u{n}', 1, 'm', 'openai-chat', false, 'completed', {n}, '2026-01-01',"
                " '2026-01-01', false, false)"
            )
        applied = runner.up()
        assert "0005_account" in applied  # later migrations may follow
        rows = db.execute_sql(
            "SELECT uid, prompt_tokens, cost, cost_nanos, upstream_id, delivered"
            " FROM completions ORDER BY uid"
        ).fetchall()
        assert rows == [(f"u{n}", n, None, None, None, None) for n in range(3)]
        assert db.execute_sql(
            "SELECT input_price, output_price, cache_read_price, cache_write_price FROM models"
        ).fetchall() == [(2.5, 10.0, None, None)]
        assert db.execute_sql("SELECT budget_usd FROM api_keys").fetchall() == [(None,)]
        # The new columns hold what the recorder writes: big nano-USD totals too.
        db.execute_sql(
            "UPDATE completions SET cost_nanos = 9000000000000000000, upstream_id = 'chatcmpl-1'"
            " WHERE uid = 'u0'"
        )
        assert db.execute_sql(
            "SELECT cost_nanos, upstream_id FROM completions WHERE uid = 'u0'"
        ).fetchall() == [(9_000_000_000_000_000_000, "chatcmpl-1")]
