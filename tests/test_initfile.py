"""Seeding from a file: created once, unchanged the second time, updated where it changed.

Through the admin API's own checks (a bad entry is refused with its place named and
nothing is applied), secrets from environment variables, keys with given values,
entries the file does not name left alone. Then the real start: gunicorn's master
applies ``GATEWAY_INIT_FILE`` before its workers serve, and a forced key calls.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gevent
import openai
import pytest

from gateway import db as gateway_db
from gateway import initfile
from gateway.config import ROOT
from gateway.db import is_postgres, open_database
from gateway.models import ApiKey, Model, Provider
from tests.servers import ADMIN_SECRET, ENCRYPTION_KEY, Gateway

FORCED = "sk-" + "0123456789abcdef" * 2
YAML = """
providers:
  - name: openai
    type: openai
    baseUrl: https://api.openai.com/v1
    apiKey: ${OPENAI_KEY}
    models:
      - systemName: gpt-4o
        remoteId: gpt-4o-2024-11-20
        inputPrice: 2.5
        outputPrice: 10
        weight: 3
      - systemName: text-embedding-3-small
        modelType: embedding
  - name: claude
    type: anthropic
    baseUrl: https://api.anthropic.com
    apiKey: ${ANTHROPIC_KEY}
    models:
      - systemName: claude-sonnet-4
keys:
  - key: ${SUPPORT_KEY}
    comment: support-bot
    rpmLimit: 100
    tpmLimit: 200000
  - comment: eval-harness
"""
ENV = {"OPENAI_KEY": "sk-openai-1234567890", "ANTHROPIC_KEY": "sk-ant-1", "SUPPORT_KEY": FORCED}


def apply(tmp_path: Path, text: str, env: dict | None = None, name: str = "seed.yaml"):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_text(text)
    return initfile.apply(initfile.load(path, ENV if env is None else env))


def state() -> list:
    """Every row the file can touch, with its updated_at: a change shows."""
    return [
        *Provider.select().order_by(Provider.id).dicts(),
        *Model.select().order_by(Model.id).dicts(),
        *ApiKey.select().order_by(ApiKey.id).dicts(),
    ]


def test_applying_twice_changes_nothing_and_a_change_is_an_update(db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = apply(tmp_path, YAML)
    assert len(first.created) == 7 and not first.updated  # 2 providers, 3 models, 2 keys
    openai_row = Provider.get(Provider.name == "openai")
    assert openai_row.api_key == "sk-openai-1234567890"  # from the environment, sealed at rest
    gpt = Model.get(Model.system_name == "gpt-4o")
    assert (gpt.input_price, gpt.output_price, gpt.weight) == (2.5, 10.0, 3.0)
    support = ApiKey.by_key(FORCED)
    assert (support.comment, support.rpm_limit, support.source) == ("support-bot", 100, "init")
    (generated,) = first.new_keys.items()
    assert generated[0] == "eval-harness" and ApiKey.by_key(generated[1]).source == "init"

    before = state()
    second = apply(tmp_path, YAML)
    assert (second.created, second.updated, second.unchanged) == ([], [], 7)
    assert not second.new_keys and state() == before  # not even an updated_at moved

    changed = YAML.replace("weight: 3", "weight: 5").replace("rpmLimit: 100", "rpmLimit: 7")
    third = apply(tmp_path, changed)
    assert sorted(third.updated) == ["key sk-0123…cdef", "model openai/gpt-4o"]
    assert Model.get_by_id(gpt.id).weight == 5 and ApiKey.by_key(FORCED).rpm_limit == 7


def test_a_model_the_file_names_is_its_live_one_beside_deleted_ones(db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Deleted models may share a live one's name (only live ones hold their name): the
    file's entry is the live model, found and left as it is, not a 409."""
    apply(tmp_path, YAML)
    gpt = Model.get(Model.system_name == "gpt-4o")
    Model.update(deleted=True).where(Model.id == gpt.id).execute()
    fields = Model.select().where(Model.id == gpt.id).dicts().get()
    del fields["id"]
    Model.create(**{**fields, "deleted": False})  # the live one, made later
    before = state()
    again = apply(tmp_path, YAML)
    assert (again.created, again.updated, again.unchanged) == ([], [], 7)
    assert state() == before


# Another process writing all the time (another instance's workers, their records):
# one short autocommitted insert after another, for the seconds given.
_OTHER_WRITER = """
import sys, time
from gateway.db import open_database
db = open_database(sys.argv[1])
db.connect()
db.execute_sql("CREATE TABLE IF NOT EXISTS other_writes (x INTEGER)")
print("writing", flush=True)
end, n = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
    db.execute_sql("INSERT INTO other_writes VALUES (1)")
    n += 1
print(n, flush=True)
"""


def test_the_file_applies_while_another_process_commits(db, database_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The file reads what exists, then writes, in one transaction. On SQLite, begun
    deferred, its first write was refused at once ("database is locked", the busy
    handler never asked) whenever another process committed in between: an instance
    that starts while another serves on the same file failed its start."""
    apply(tmp_path, YAML)
    writer = subprocess.Popen(
        [sys.executable, "-c", _OTHER_WRITER, database_url, "4"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        for weight in range(4, 24):
            changed = apply(tmp_path, YAML.replace("weight: 3", f"weight: {weight}"))
            assert changed.updated == ["model openai/gpt-4o"]
        assert Model.get(Model.system_name == "gpt-4o").weight == 23
        assert writer.poll() is None, "the other process stopped writing: nothing was tested"
    finally:
        out, _ = writer.communicate(timeout=30)
    assert writer.returncode == 0 and int(out) > 100, out


# An instance's start, up to its init file: the app as ``wsgi`` builds it, then
# ``flask init-file`` (what ``flask prepare`` runs) once the file ``go`` exists.
_STARTING = """
import sys, time
from pathlib import Path
from wsgi import app
path, go = sys.argv[1], Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
result = app.test_cli_runner().invoke(args=["init-file", path])
print(result.output, flush=True)
sys.exit(result.exit_code)
"""


def _many(count: int) -> str:
    """An init file of ``count`` providers of three models each and ``count`` keys made
    here, found again by their comment: long enough to apply that two overlap."""
    providers = "".join(
        f"""
  - name: p{i}
    baseUrl: https://p{i}.example/v1
    models: [{{systemName: a{i}}}, {{systemName: b{i}}}, {{systemName: c{i}}}]"""
        for i in range(count)
    )
    keys = "".join(f"\n  - comment: bot-{i}" for i in range(count))
    return f"providers:{providers}\nkeys:{keys}\n"


def test_instances_that_start_at_once_apply_the_file_once(db, database_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Several instances on one database start together (a deployment scaled out), each
    applying the same file: one creates, the others find it made. Unserialized, each
    read "not there" before another's commit: on PostgreSQL the later ones failed their
    start on a name taken, or made a second key of the same comment; on SQLite, begun
    deferred, their first write was refused ("database is locked")."""
    path = tmp_path / "seed.yaml"
    path.write_text(_many(40))
    go = tmp_path / "go"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ADMIN_SUPER_SECRET": ADMIN_SECRET,
        "GATEWAY_ENCRYPTION_KEYS": ENCRYPTION_KEY,
        "GATEWAY_INSTANCE_PATH": str(tmp_path / "instance"),
    }
    logs = [tmp_path / f"start-{i}.log" for i in range(3)]
    starts = []
    for log in logs:
        with log.open("w") as stderr:
            starts.append(
                subprocess.Popen(
                    [sys.executable, "-c", _STARTING, str(path), str(go)],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                )
            )
    for start in starts:
        assert start.stdout is not None and start.stdout.readline() == "ready\n"
    go.touch()
    outputs = [start.communicate(timeout=60)[0] for start in starts]
    assert [start.returncode for start in starts] == [0, 0, 0], (
        outputs,
        [log.read_text()[-2000:] for log in logs],
    )
    summaries = sorted(re.search(r"seed.yaml: (.*)", out).group(1) for out in outputs)  # type: ignore[union-attr]
    assert summaries == [
        "0 created, 0 updated, 200 unchanged",
        "0 created, 0 updated, 200 unchanged",
        "200 created, 0 updated, 0 unchanged",
    ], outputs
    assert Provider.select().count() == 40 and Model.select().count() == 120
    comments = [k.comment for k in ApiKey.select().where(ApiKey.source == "init")]
    assert sorted(comments) == sorted(f"bot-{i}" for i in range(40))


@pytest.mark.parametrize("lock", ["MIGRATION_LOCK", "RETENTION_LOCK"])
def test_the_file_waits_for_no_other_job_that_runs_alone(db, database_url, tmp_path, lock) -> None:  # type: ignore[no-untyped-def]
    """Each job that runs in one instance at a time has a lock of its own: the file
    applies while another instance holds another job's (a retention round lasts
    minutes). PostgreSQL's advisory locks; SQLite's jobs take no lock of this kind."""
    if not is_postgres():
        pytest.skip("PostgreSQL's advisory locks")
    other = open_database(database_url)
    other.connect()
    try:
        other.execute_sql("SELECT pg_advisory_lock(%s)", (getattr(gateway_db, lock),))
        with gevent.Timeout(5):
            assert len(apply(tmp_path, YAML).created) == 7
    finally:
        other.close()
        other.close_all()  # the pool's connection, and the lock with it


def test_what_the_file_does_not_name_is_left_alone(db, tmp_path, client) -> None:  # type: ignore[no-untyped-def]
    apply(tmp_path, YAML)
    other = Provider.create(name="mine", base_url="https://mine.example/v1")
    revoked = ApiKey.by_key(FORCED)
    ApiKey.update(revoked=True, comment="edited by hand").where(ApiKey.id == revoked.id).execute()
    outcome = apply(tmp_path, YAML)
    assert Provider.get_by_id(other.id).deleted is False
    row = ApiKey.by_key(FORCED)
    assert row.revoked is True  # an operator's revocation stays
    assert row.comment == "support-bot" and outcome.updated == ["key sk-0123…cdef"]
    apply(
        tmp_path,
        YAML.replace("    comment: support-bot", "    comment: support-bot\n    revoked: false"),
    )
    assert ApiKey.by_key(FORCED).revoked is False


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (YAML, {"OPENAI_KEY": "x", "SUPPORT_KEY": FORCED}, "providers[1].apiKey: environment variable ANTHROPIC_KEY is not set"),
        (YAML.replace("https://api.anthropic.com", "ftp://nope"), None, "providers[1]: baseUrl must be an http(s) URL"),
        (YAML.replace("weight: 3", "weight: -1"), None, "providers[0].models[0]: weight must be at least 0"),
        (YAML.replace("tpmLimit: 200000", "tpmLimit: many"), None, "keys[0]: tpmLimit must be an integer"),
        (YAML, {**ENV, "SUPPORT_KEY": "sk-short"}, "keys[0]: key must be sk- and 32 lowercase hex digits"),
        ("providers: {name: x}", None, "providers must be a list of mappings"),
        ("upstreams: []", None, "must be a mapping of providers and keys"),
        ("providers: [\n  - name: [", None, "is not valid YAML"),
    ],
)  # fmt: skip
def test_a_bad_file_names_the_place_and_applies_nothing(db, tmp_path, text, env, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(initfile.InitFileError, match=re.escape(message)):
        apply(tmp_path, text, env)
    assert state() == []


def test_json_files_and_literal_dollar_braces(db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = {
        "providers": [{"name": "p", "baseUrl": "https://x.example/v1", "comment": "cost $${HIGH}"}]
    }
    apply(tmp_path, json.dumps(data), name="seed.json")
    assert Provider.get(Provider.name == "p").comment == "cost ${HIGH}"
    with pytest.raises(initfile.InitFileError, match="is not valid JSON"):
        apply(tmp_path, "{", name="seed.json")


def test_prepare_applies_the_file_and_stops_the_start_on_an_error(
    app, runner, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "seed.yaml"
    path.write_text(YAML)
    app.config["INIT_FILE"] = str(path)

    def prepare():  # type: ignore[no-untyped-def]
        with app.app_context():  # as `flask --app wsgi prepare` runs it
            return runner.invoke(args=["prepare"])

    result = prepare()
    assert result.exit_code == 0, result.output
    assert "init file" in result.output and "7 created, 0 updated, 0 unchanged" in result.output
    assert "key 'eval-harness' created (shown only now): sk-" in result.output
    assert "7 unchanged" in prepare().output
    monkeypatch.delenv("OPENAI_KEY")
    failed = prepare()
    assert failed.exit_code != 0 and "environment variable OPENAI_KEY is not set" in failed.output


@pytest.mark.server
def test_gunicorn_applies_the_file_before_it_serves(gateway_factory, fake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    call_id = f"init-{tmp_path.name}"  # the fake upstream outlives this test
    seed = tmp_path / "seed.yaml"
    seed.write_text(
        f"""
providers:
  - name: fake
    baseUrl: {fake.url}/v1
    apiKey: ${{FAKE_KEY}}
    models: [{{systemName: fake, remoteId: "fake;id={call_id};chunks=2"}}]
keys:
  - {{key: "{FORCED}", comment: from-file}}
"""
    )
    gw: Gateway = gateway_factory(GATEWAY_INIT_FILE=str(seed), FAKE_KEY="upstream-secret")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=FORCED, max_retries=0)
    answer = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
    (sent,) = fake.log(call_id)
    assert sent["headers"]["authorization"] == "Bearer upstream-secret"
    assert "init file" in gw.log() and "3 created, 0 updated" in gw.log()
