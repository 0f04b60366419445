"""Provider keys encrypted at rest: sealing, rotation, plain rows from before, key files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from flask import Flask

from gateway import create_app, registry
from gateway.db import database
from gateway.models import Provider
from gateway.vault import KEY_FILE, PREFIX, Vault, vault
from tests.servers import ADMIN_SECRET

SECRET = "sk-provider-0123456789-secret"


def raw_keys() -> dict[int, str | None]:
    """providers.api_key as the table holds it (no decryption)."""
    with database.connection_context():
        query = Provider.select(Provider.id, Provider.api_key)
        return dict(database.execute(query))


def gateway_app(database_url: str, tmp_path: Path, keys: list[str]) -> Flask:
    return create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "ADMIN_SUPER_SECRET": ADMIN_SECRET,
            "JOURNAL_DIR": str(tmp_path / "journal"),
            "ENCRYPTION_KEYS": ",".join(keys),
        }
    )


def test_a_provider_key_is_stored_sealed_and_read_back_plain(app, db) -> None:  # type: ignore[no-untyped-def]
    row = Provider.create(name="p", base_url="https://x.example", api_key=SECRET)
    stored = raw_keys()[row.id]
    assert stored.startswith(PREFIX) and SECRET not in stored
    assert Provider.get_by_id(row.id).api_key == SECRET
    Provider.update(api_key="sk-other-9876543210").where(Provider.id == row.id).execute()
    assert raw_keys()[row.id].startswith(PREFIX)
    assert Provider.get_by_id(row.id).api_key == "sk-other-9876543210"
    # Long keys fit: the column is text now (a sealed 255-character key is 400 long).
    Provider.update(api_key="k" * 1000).where(Provider.id == row.id).execute()
    assert Provider.get_by_id(row.id).api_key == "k" * 1000


def test_rotation_reseals_every_key_and_reads_plain_rows_from_before(
    database_url: str, tmp_path: Path
) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    app = gateway_app(database_url, tmp_path, [old])
    with database.connection_context():
        sealed = Provider.create(name="sealed", base_url="https://x.example", api_key=SECRET)
        plain = Provider.create(name="plain", base_url="https://x.example")
        # A row written before encryption existed holds its key as plain text.
        database.execute_sql(
            f"UPDATE providers SET api_key = {database.param} WHERE id = {database.param}",
            ("sk-plain-key-from-before", plain.id),
        )
        keyless = Provider.create(name="none", base_url="https://x.example")
    assert raw_keys()[plain.id] == "sk-plain-key-from-before"

    # The new key goes in front; the old one still opens what it sealed.
    app = gateway_app(database_url, tmp_path, [new, old])
    with database.connection_context():
        assert Provider.get_by_id(plain.id).api_key == "sk-plain-key-from-before"
        assert Provider.get_by_id(sealed.id).api_key == SECRET
    result = app.test_cli_runner().invoke(args=["rotate-keys"])
    assert result.exit_code == 0 and "sealed 2 provider keys" in result.output
    stored = raw_keys()
    assert stored[keyless.id] is None
    assert all(stored[i].startswith(PREFIX) for i in (sealed.id, plain.id))

    # Once rotated, the old key can go.
    app = gateway_app(database_url, tmp_path, [new])
    with database.connection_context():
        assert Provider.get_by_id(sealed.id).api_key == SECRET
        assert Provider.get_by_id(plain.id).api_key == "sk-plain-key-from-before"

    # A key nobody configured cannot open them: each reads as None (not a crash),
    # the start banner and the rotation say which.
    app = gateway_app(database_url, tmp_path, [Fernet.generate_key().decode()])
    with database.connection_context():
        assert Provider.get_by_id(sealed.id).api_key is None
        assert registry.unreadable_provider_keys() == [sealed.id, plain.id]
    result = app.test_cli_runner().invoke(args=["rotate-keys"])
    assert result.exit_code != 0 and f"[{sealed.id}, {plain.id}]" in result.output


def test_without_configured_keys_one_is_generated_into_a_private_file(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    first = Vault()
    first.init_app(app)
    path = tmp_path / "instance" / KEY_FILE
    assert first.generated and first.source == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    sealed = first.seal(SECRET)
    again = Vault()  # another worker, or the next start: the same key, not a new one
    again.init_app(app)
    assert not again.generated and again.open(sealed) == SECRET


def test_keys_that_are_not_fernet_keys_stop_the_start(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config["ENCRYPTION_KEYS"] = "not-a-key"
    with pytest.raises(RuntimeError, match="not Fernet keys"):
        Vault().init_app(app)


def test_a_new_sqlite_database_is_private(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "gateway.db"
    gateway_app(f"sqlite:///{path}", tmp_path, [Fernet.generate_key().decode()])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_start_banner_names_configured_keys(app) -> None:  # type: ignore[no-untyped-def]
    with app.app_context():  # as `flask --app wsgi prepare` runs it
        result = app.test_cli_runner().invoke(args=["prepare"])
    assert result.exit_code == 0, result.output
    assert "provider keys encrypted with GATEWAY_ENCRYPTION_KEYS" in result.output
    assert vault.source == "GATEWAY_ENCRYPTION_KEYS"


@pytest.mark.server
def test_make_run_needs_no_key_and_a_restart_reads_what_it_sealed(
    app, gateway_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(GATEWAY_ENCRYPTION_KEYS="")  # as `make run`: nothing configured
    path = tmp_path / "instance0" / KEY_FILE
    assert f"encrypted with the key in {path} (generated now, mode 0600)" in gw.log()
    assert "every instance sharing this database needs that same key" in gw.log()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    created = gw.api(
        "POST", "/providers", json={"name": "p", "baseUrl": "https://x.example", "apiKey": SECRET}
    )
    assert created["apiKey"] == "sk-…cret"
    assert raw_keys()[created["id"]].startswith(PREFIX)
    gw.stop()
    again = gateway_factory(GATEWAY_ENCRYPTION_KEYS="", GATEWAY_INSTANCE_PATH=str(path.parent))
    assert "generated now" not in again.log()
    assert again.api("GET", f"/providers/{created['id']}")["apiKey"] == "sk-…cret"
