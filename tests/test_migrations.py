"""Upgrading a database keeps its rows: the account's migration on a database in use.

A database migrated up to the migration before the account's, with a key, a model and
call records in it, is migrated the rest of the way: every row is still there, the old
records have no cost (which is what they had), and the new columns take values.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import peewee
import pytest
from hypothesis import given, settings
from playhouse.migrations import Runner

from gateway import jsoncodec, jsonio
from gateway.db import MIGRATIONS, open_database
from tests import pools
from tests.conftest import BACKENDS, PG_URL, _pg_admin, _test_app, _with_database
from tests.fuzz_support import FUZZ, message_lists, odd, words

BEFORE = "0003_sealed_keys_and_sessions"  # the latest migration before the account's


@pytest.fixture(params=BACKENDS)
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[peewee.Database]:
    """A database with no tables at all, on each backend."""
    if request.param == "sqlite":
        db = open_database(f"sqlite:///{tmp_path / 'old.db'}")
        yield db
        db.close()
        return
    yield from _empty_postgres()


@pytest.fixture
def empty_postgres() -> Iterator[peewee.Database]:
    """An empty PostgreSQL database, for what only PostgreSQL needs."""
    if not PG_URL:
        pytest.skip("PostgreSQL only (GATEWAY_TEST_DATABASE_URL)")
    yield from _empty_postgres()


def _empty_postgres() -> Iterator[peewee.Database]:
    name = f"gw_m_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin.connection_context():
        admin.execute_sql(f'CREATE DATABASE "{name}"')
    db = open_database(_with_database(PG_URL, name))
    try:
        yield db
    finally:
        pools.release(db)  # the tests below lend it to the proxy that background writers use
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


def test_the_partitioning_migration_keeps_every_row_and_the_upsert_by_uid(
    empty_database: peewee.Database,
) -> None:
    """0007 on a table with rows: PostgreSQL partitions it by month, SQLite keeps it."""
    db = empty_database
    with db.connection_context():
        runner = Runner(db, directory=str(MIGRATIONS))
        runner.up(target="0006_search")
        db.execute_sql(
            "INSERT INTO api_keys (key_hash, key_hint, created_at, updated_at, revoked,"
            " rpm_limit, tpm_limit, source) VALUES ('h', 'sk-…1', '2026-01-01', '2026-01-01',"
            " false, 50, 50000, 'manual')"
        )
        # Old rows, this month's, and one far ahead (a clock gone wrong).
        dates = ["2024-02-29 23:59:59", "2025-07-01 00:00:00", "2026-11-30 12:00:00"]
        dates += ["2031-05-05 05:05:05"]
        for n, when in enumerate(dates):
            db.execute_sql(
                "INSERT INTO completions (uid, api_key_id, model, api_format, stream, status,"
                " prompt, completion, prompt_tokens, created_at, updated_at, swept, deleted)"
                f" VALUES ('u{n}', 1, 'm', 'openai-chat', false,"
                f" '{'pending' if n == 2 else 'completed'}',"
                f""" '{{"messages": [{{"role": "user", "content": "word{n}"}}]}}', '[]',"""
                f" {n}, '{when}', '{when}', false, false)"
            )
        assert "0007_partitions" in runner.up()
        rows = db.execute_sql(
            "SELECT id, uid, prompt_tokens FROM completions ORDER BY id"
        ).fetchall()
        assert rows == [(n + 1, f"u{n}", n) for n in range(len(dates))]

    from gateway import fulltext
    from gateway.db import database
    from gateway.models import Completion
    from gateway.writes import upsert_records

    database.initialize(db)
    with db.connection_context():
        # Found by their text, as before.
        hits = Completion.select(Completion.uid).where(fulltext.condition(Completion, ["word1"]))
        assert [r.uid for r in hits] == ["u1"]
        # The recorder's upsert still lands on the row of its uid, and new ids follow on.
        when = Completion.get(Completion.uid == "u2").created_at
        base = {"kind": "completion", "api_key": 1, "model": "m", "api_format": "openai-chat"}
        upsert_records(
            [
                {**base, "uid": "u2", "status": "failed", "created_at": when},
                {**base, "uid": "new", "status": "completed", "created_at": when},
            ]
        )
        got = dict(Completion.select(Completion.uid, Completion.status).tuples())
        assert got == {"u0": "completed", "u1": "completed", "u2": "failed", "u3": "completed"} | {
            "new": "completed"
        }
        assert Completion.get(Completion.uid == "new").id > len(dates)
        if isinstance(db, peewee.PostgresqlDatabase):
            parts = {
                name: bound
                for name, bound in db.execute_sql(
                    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
                    " JOIN pg_class c ON c.oid = i.inhrelid"
                    " WHERE i.inhparent = 'completions'::regclass"
                ).fetchall()
            }
            # The old table, holding every row until the month after the newest, then
            # partitions ahead of that only if it ends before them, and the DEFAULT.
            assert "MINVALUE" in parts["completions_legacy"]
            assert "2031-06-01" in parts["completions_legacy"]
            assert parts["completions_default"] == "DEFAULT"


def test_swept_at_marks_the_rows_swept_before_it_and_survives_the_calls_own_final_state(
    empty_database: peewee.Database,
) -> None:
    """0009 on tables with rows: the swept ones (failed, waiting for their call's own
    state) get the sweep's time; the call's own final state later keeps it."""
    db = empty_database
    with db.connection_context():
        runner = Runner(db, directory=str(MIGRATIONS))
        runner.up(target="0008_response_facts")
        db.execute_sql(
            "INSERT INTO api_keys (key_hash, key_hint, created_at, updated_at, revoked,"
            " rpm_limit, tpm_limit, source) VALUES ('h', 'sk-…1', '2026-01-01', '2026-01-01',"
            " false, 50, 50000, 'manual')"
        )
        swept_on = "2026-02-02 02:02:02"
        rows = [("done", "completed", False), ("fail", "failed", False), ("orphan", "failed", True)]
        for uid, status, swept in rows:
            db.execute_sql(
                "INSERT INTO completions (uid, api_key_id, model, api_format, stream, status,"
                " created_at, updated_at, swept, deleted) VALUES"
                f" ('{uid}', 1, 'm', 'openai-chat', false, '{status}', '2026-02-01',"
                f" '{swept_on}', {str(swept).lower()}, false)"
            )
        db.execute_sql(
            "INSERT INTO embeddings (uid, api_key_id, model, status, created_at, updated_at,"
            f" swept, deleted) VALUES ('e-orphan', 1, 'e', 'failed', '2026-02-01', '{swept_on}',"
            " true, false)"
        )
        assert "0009_swept_at" in runner.up()
        from gateway.db import database
        from gateway.models import Completion, Embedding
        from gateway.writes import upsert_records

        database.initialize(db)
        swept_at = dict(Completion.select(Completion.uid, Completion.swept_at).tuples())
        when = datetime(2026, 2, 2, 2, 2, 2)
        assert swept_at == {"done": None, "fail": None, "orphan": when}
        assert Embedding.get(Embedding.uid == "e-orphan").swept_at == when
        # Its process was alive after all: its own final state replaces the swept row,
        # which remembers the sweep, and the write says so.
        base = {"kind": "completion", "api_key": 1, "model": "m", "api_format": "openai-chat"}
        created = datetime(2026, 2, 1)
        written = upsert_records(
            [
                {**base, "uid": "orphan", "status": "completed", "created_at": created},
                {**base, "uid": "fail", "status": "completed", "created_at": created},  # refused
            ]
        )
        orphan = Completion.get(Completion.uid == "orphan")
        assert [(r["uid"], r["id"], r["swept_at"]) for r in written] == [
            ("orphan", orphan.id, when)
        ]
        assert (orphan.status, orphan.swept, orphan.swept_at) == ("completed", False, when)


def test_the_migrate_command_migrates_an_empty_database_as_its_backend_needs(
    empty_database: peewee.Database, tmp_path: Path
) -> None:
    """What ``make run`` and a deployment do first (``flask migrate``, ``prepare``): the
    migrations must see the real database, not the app's proxy of it, or a PostgreSQL
    database gets SQLite's statements (0006 failed, 0007 was skipped)."""
    db = empty_database
    postgres = isinstance(db, peewee.PostgresqlDatabase)
    url = _with_database(PG_URL, db.database) if postgres else f"sqlite:///{db.database}"
    with _test_app(url, tmp_path) as app:
        result = app.test_cli_runner().invoke(args=["migrate"])
        assert result.exit_code == 0, result.output
        assert "applied: 0001_initial" in result.output
    with db.connection_context():
        if postgres:
            (kind,) = db.execute_sql(
                "SELECT relkind FROM pg_class WHERE relname = 'completions'"
            ).fetchone()
            assert kind == "p"  # partitioned by month (0007)
            assert "search" in {c.name for c in db.get_columns("completions")}  # 0006
        else:
            assert "completions_fts" in db.get_tables()
            assert "completions_fts_writer" in db.get_tables()  # 0010


def test_a_provider_key_column_left_short_by_the_proxy_bug_becomes_text(
    empty_postgres: peewee.Database,
) -> None:
    """0011 repairs what 0003 did when it took SQLite's branch on PostgreSQL."""
    db = empty_postgres
    with db.connection_context():
        runner = Runner(db, directory=str(MIGRATIONS))
        runner.up(target="0010_fts_from_the_recorder")
        db.execute_sql("ALTER TABLE providers ALTER COLUMN api_key TYPE varchar(255)")
        assert runner.up(target="0011_provider_key_text") == ["0011_provider_key_text"]
        (kind,) = db.execute_sql(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_name = 'providers' AND column_name = 'api_key'"
        ).fetchone()
        assert kind == "text"


def test_numbers_become_double_precision_keeping_the_values_read_before(
    empty_postgres: peewee.Database,
) -> None:
    """0012: prices, weights, budgets and refills from real to double precision; each
    value reads back as before (0.1, not 0.10000000149...), and now holds 15 digits."""
    db = empty_postgres
    real = (0.1, 2.5, 1234567.9, 3e-7)  # what psycopg read from real columns
    with db.connection_context():
        runner = Runner(db, directory=str(MIGRATIONS))
        runner.up(target="0011_provider_key_text")
        db.execute_sql(
            "INSERT INTO providers (name, type, base_url, stream_usage, created_at,"
            " updated_at, deleted) VALUES ('p', 'openai', 'http://x', true, now(), now(),"
            " false)"
        )
        for n, value in enumerate(real):
            db.execute_sql(
                "INSERT INTO models (provider_id, system_name, remote_id, input_price,"
                " output_price, weight, model_type, created_at, updated_at, deleted)"
                " VALUES (1, %s, 'r', %s, %s, %s, 'chat', now(), now(), false)",
                (f"m{n}", value, value, value),
            )
            db.execute_sql(
                "INSERT INTO api_keys (key_hash, key_hint, created_at, updated_at, revoked,"
                " rpm_limit, tpm_limit, source, budget_usd) VALUES (%s, 'sk-…1', now(),"
                " now(), false, 1, 1, 'manual', %s)",
                (f"h{n}", value),
            )
        before = db.execute_sql(
            "SELECT input_price, output_price, weight FROM models ORDER BY id"
        ).fetchall()
        assert [row[0] for row in before] == list(real)  # real, read as psycopg reads it
        assert runner.up(target="0012_numbers_double_precision") == [
            "0012_numbers_double_precision"
        ]
        kinds = dict(
            db.execute_sql(
                "SELECT table_name || '.' || column_name, data_type"
                " FROM information_schema.columns WHERE table_schema = current_schema()"
                " AND table_name IN ('models', 'api_keys', 'rate_limits', 'completions')"
                " AND data_type IN ('real', 'double precision')"
            ).fetchall()
        )
        assert kinds == {
            **dict.fromkeys(
                [
                    "models.input_price",
                    "models.output_price",
                    "models.cache_read_price",
                    "models.cache_write_price",
                    "models.weight",
                    "api_keys.budget_usd",
                    "rate_limits.refill",
                ],
                "double precision",
            ),
            "completions.rating": "real",  # the records table is left as it was
        }
        after = db.execute_sql(
            "SELECT input_price, output_price, weight FROM models ORDER BY id"
        ).fetchall()
        assert after == before
        budgets = db.execute_sql("SELECT budget_usd FROM api_keys ORDER BY id").fetchall()
        assert [row[0] for row in budgets] == list(real)
        db.execute_sql("UPDATE api_keys SET budget_usd = %s WHERE id = 1", (1234567.89,))
        assert db.execute_sql("SELECT budget_usd FROM api_keys WHERE id = 1").fetchone() == (
            1234567.89,
        )


def test_the_full_text_index_merges_eight_segments_at_a_time(
    empty_database: peewee.Database,
) -> None:
    """0013: SQLite's FTS5 index keeps its automerge setting (PostgreSQL: nothing to do)."""
    db = empty_database
    with db.connection_context():
        runner = Runner(db, directory=str(MIGRATIONS))
        runner.up(target="0012_numbers_double_precision")
        assert runner.up(target="0013_fts_automerge") == ["0013_fts_automerge"]
        if isinstance(db, peewee.PostgresqlDatabase):
            assert "completions_fts" not in db.get_tables()
            return
        config = dict(db.execute_sql("SELECT k, v FROM completions_fts_config").fetchall())
        assert config.get("automerge") == 8


def test_the_recorder_text_waits_for_the_index_in_a_table_of_its_own(
    empty_database: peewee.Database,
) -> None:
    """0014: SQLite's rows due to the full-text index, and the triggers that drop a due
    text when they index the row themselves or it is deleted (PostgreSQL: nothing)."""
    db = empty_database
    with db.connection_context():
        runner = Runner(db, directory=str(MIGRATIONS))
        runner.up(target="0013_fts_automerge")
        assert runner.up(target="0014_fts_due") == ["0014_fts_due"]
        if isinstance(db, peewee.PostgresqlDatabase):
            assert "completions_fts_due" not in db.get_tables()
            return
        assert "completions_fts_due" in db.get_tables()
        sql = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
        triggers = dict(db.execute_sql(sql).fetchall())
        for name in ("completions_fts_update", "completions_fts_delete"):
            assert "DELETE FROM completions_fts_due WHERE id = old.id" in triggers[name], name
        assert "completions_fts_due" not in triggers["completions_fts_insert"]
        assert "completions_fts_writer" in triggers["completions_fts_update"]  # 0010 kept


def _indexes(db: peewee.Database) -> dict[str, str]:
    """Every index of calls and embeddings (on PostgreSQL, of each partition too): its
    name and definition."""
    if isinstance(db, peewee.PostgresqlDatabase):
        sql = (
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
            " AND (tablename LIKE 'completions%%' OR tablename = 'embeddings')"
        )
    else:
        sql = (
            "SELECT name, coalesce(sql, '') FROM sqlite_master WHERE type = 'index'"
            " AND tbl_name IN ('completions', 'embeddings')"
        )
    return dict(db.execute_sql(sql).fetchall())


def test_calls_and_embeddings_lose_the_index_on_the_key_alone(
    empty_database: peewee.Database,
) -> None:
    """0015: no index on ``api_key_id`` alone is left (each partition's neither); the one on
    ``(api_key_id, created_at)`` stays, and a lookup by key alone uses it."""
    db = empty_database
    with db.connection_context():
        runner = Runner(db, directory=str(MIGRATIONS))
        runner.up(target="0014_fts_due")
        before = _indexes(db)
        key_only = {n for n, d in before.items() if d.replace('"', "").endswith("(api_key_id)")}
        assert {"completions_api_key_id", "embeddings_api_key_id"} <= key_only
        assert runner.up(target="0015_no_key_only_index") == ["0015_no_key_only_index"]
        after = _indexes(db)
        assert not {n for n, d in after.items() if d.replace('"', "").endswith("(api_key_id)")}
        assert set(before) - set(after) == key_only
        for table in ("completions", "embeddings"):
            assert f"{table}_api_key_id_created_at" in after
        if isinstance(db, peewee.SqliteDatabase):
            plan = db.execute_sql(
                "EXPLAIN QUERY PLAN SELECT id FROM completions WHERE api_key_id = 1"
            ).fetchall()
            assert "completions_api_key_id_created_at" in str(plan)


def test_the_messages_text_is_read_by_plpgsql_and_says_what_sql_said(
    empty_postgres: peewee.Database,
) -> None:
    """0016 (PostgreSQL): ``gateway_messages_text`` is PL/pgSQL (never planned for
    inlining at each write), and whatever the messages hold it gives the text 0006's SQL
    function gave; a row written before keeps its ``search``, equal to the same row's
    written after."""
    db = empty_postgres
    with db.connection_context():
        runner = Runner(db, directory=str(MIGRATIONS))
        runner.up(target="0015_no_key_only_index")
        (source,) = db.execute_sql(
            "SELECT prosrc FROM pg_proc WHERE proname = 'gateway_messages_text'"
        ).fetchone()
        db.execute_sql(
            "CREATE FUNCTION sql_messages_text(messages jsonb) RETURNS text"
            f" LANGUAGE sql IMMUTABLE AS $fn${source}$fn$"
        )
        db.execute_sql(
            "INSERT INTO api_keys (key_hash, key_hint, created_at, updated_at, revoked,"
            " rpm_limit, tpm_limit, source) VALUES ('h', 'h', now(), now(), false, 0, 0, 'x')"
        )
        prompt = {"messages": [{"role": "user", "content": "ship's log 数据库 tool_calls"}]}
        completion = [{"role": "assistant", "content": [{"type": "text", "text": "aye"}]}]

        def search_of_a_new_row() -> str:
            (search,) = db.execute_sql(
                "INSERT INTO completions (uid, api_key_id, model, api_format, stream, prompt,"
                " completion, status, created_at, updated_at, deleted, swept) SELECT %s, id,"
                " 'm', 'openai-chat', false, %s, %s, 'completed', now(), now(), false, false"
                " FROM api_keys RETURNING search::text",
                (uuid.uuid4().hex, json.dumps(prompt), json.dumps(completion)),
            ).fetchone()
            return search

        before = search_of_a_new_row()
        assert "'数'" in before and "'aye'" in before
        assert runner.up(target="0016_search_text_plpgsql") == ["0016_search_text_plpgsql"]
        (language,) = db.execute_sql(
            "SELECT lanname FROM pg_proc JOIN pg_language l ON l.oid = prolang"
            " WHERE proname = 'gateway_messages_text'"
        ).fetchone()
        assert language == "plpgsql"
        assert search_of_a_new_row() == before
        kept = db.execute_sql("SELECT DISTINCT search::text FROM completions").fetchall()
        assert kept == [(before,)]

        @settings(FUZZ, max_examples=300)
        @given(message_lists | odd | words)
        def same_text(messages: Any) -> None:
            doc = jsoncodec.encode(jsonio.clean(messages)).decode()
            sql, plpgsql = db.execute_sql(
                "SELECT sql_messages_text(%s::jsonb), gateway_messages_text(%s::jsonb)",
                (doc, doc),
            ).fetchone()
            assert plpgsql == sql

        same_text()


def test_a_deleted_model_keeps_its_row_and_no_longer_its_name(
    empty_database: peewee.Database,
) -> None:
    """0017: the models of a database in use are all there after it; a deleted model's
    name may be taken by another model of its provider, a live one's still may not."""
    db = empty_database
    with db.connection_context():
        runner = Runner(db, directory=str(MIGRATIONS))
        runner.up(target="0016_search_text_plpgsql")
        db.execute_sql(
            "INSERT INTO providers (name, type, base_url, stream_usage, created_at, updated_at,"
            " deleted) VALUES ('p', 'openai', 'http://x', true, '2026-01-01', '2026-01-01', false)"
        )
        insert = (
            "INSERT INTO models (provider_id, system_name, model_type, weight, created_at,"
            " updated_at, deleted) VALUES (1, %s, 'chat', 1, '2026-01-01', '2026-01-01', %s)"
        )
        if isinstance(db, peewee.SqliteDatabase):
            insert = insert.replace("%s", "?")
        db.execute_sql(insert, ("old", True))
        db.execute_sql(insert, ("live", False))
        with pytest.raises(peewee.IntegrityError), db.atomic():
            db.execute_sql(insert, ("old", False))
        assert runner.up(target="0017_live_model_names") == ["0017_live_model_names"]
        rows = "SELECT system_name, deleted FROM models ORDER BY id"
        assert [(n, bool(d)) for n, d in db.execute_sql(rows)] == [("old", True), ("live", False)]
        db.execute_sql(insert, ("old", False))  # the deleted model's name, taken again
        db.execute_sql(insert, ("live", True))  # a deleted one may share a live one's
        with pytest.raises(peewee.IntegrityError), db.atomic():
            db.execute_sql(insert, ("live", False))
        with pytest.raises(peewee.IntegrityError), db.atomic():
            db.execute_sql(insert, ("old", False))
