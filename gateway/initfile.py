"""Seeding from a file: ``GATEWAY_INIT_FILE`` declares providers, models and keys.

Applied at every start (``flask prepare``, which gunicorn's master runs) and by
``flask --app wsgi init-file PATH``, through ``registry``: the admin API's checks and
changes, so a file can hold nothing the API would refuse. YAML (``.yaml``/``.yml``)
or JSON. Secrets come from the environment: ``${NAME}`` anywhere in a string is
replaced by that variable (``$${`` is a literal ``${``); a variable that is not set
is an error naming it, and nothing is applied.

Idempotent: entries are matched (providers by name among live ones, models by their
provider and system name, keys by their value's hash, or, for a key given without a
value, by its comment among keys the file made) and only fields that differ are
written; applying a file twice changes nothing. The file seeds, it does not own:
entries it does not name are left alone, fields it does not give keep their values,
and a key an operator revoked stays revoked unless the file says ``revoked: false``.
All of it is one transaction: an error leaves the database as it was. Instances
that start together apply it one at a time (``db.alone``): the first creates, the
others find it made.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import db, redact, registry
from gateway.models import ApiKey, Model, Provider

_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SECTIONS = ("providers", "keys")


class InitFileError(ValueError):
    """The file cannot be applied; the message says where and why."""


@dataclass
class Outcome:
    """What applying the file did."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    new_keys: dict[str, str] = field(default_factory=dict)  # comment -> the generated key

    def summary(self) -> str:
        return (
            f"{len(self.created)} created, {len(self.updated)} updated, {self.unchanged} unchanged"
        )


def load(path: Path, environ: dict[str, str] | None = None) -> dict:
    """The file as data, every ``${NAME}`` replaced from ``environ``."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InitFileError(f"cannot read {path}: {exc}") from exc
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        if is_yaml:
            import yaml  # only a YAML file needs PyYAML

            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    except Exception as exc:  # json's ValueError, yaml's YAMLError: say where it broke
        raise InitFileError(f"{path} is not valid {'YAML' if is_yaml else 'JSON'}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict) or set(data) - set(SECTIONS):
        raise InitFileError(f"{path} must be a mapping of {' and '.join(SECTIONS)}")
    return _substitute(data, os.environ if environ is None else environ, "")


def _substitute(value: Any, environ: dict[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {
            k: _substitute(v, environ, f"{where}.{k}" if where else k) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_substitute(v, environ, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name is None:
            return "${"
        if name not in environ:
            raise InitFileError(f"{where}: environment variable {name} is not set")
        return environ[name]

    return _VARIABLE.sub(replace, value)


def apply(data: dict) -> Outcome:
    """Create or update what ``data`` declares, in one transaction, one instance at a
    time: instances that start together each find what the one before them made."""
    outcome = Outcome()
    with db.alone(db.INIT_FILE_LOCK):
        for i, entry in enumerate(_entries(data, "providers")):
            _provider(entry, f"providers[{i}]", outcome)
        for i, entry in enumerate(_entries(data, "keys")):
            _key(entry, f"keys[{i}]", outcome)
    return outcome


def _entries(data: dict, section: str) -> list[dict]:
    entries = data.get(section) or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InitFileError(f"{section} must be a list of mappings")
    return entries


def _checked(where: str, check: Any, *args: Any, **kwargs: Any) -> Any:
    """A registry call; its refusal becomes an error naming the entry."""
    try:
        return check(*args, **kwargs)
    except registry.Refused as exc:
        raise InitFileError(f"{where}: {exc.message}") from exc


def _changes(row: Any, data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if getattr(row, k) != v}


def _provider(entry: dict, where: str, outcome: Outcome) -> None:
    body = {k: v for k, v in entry.items() if k != "models"}
    data = _checked(where, registry.provider_fields, body, required=True)
    row = Provider.active().where(Provider.name == data["name"]).first()
    label = f"provider {data['name']}"
    if row is None:
        row = _checked(where, registry.add_provider, data)
        outcome.created.append(label)
    elif changes := _changes(row, data):
        _checked(where, registry.edit_provider, row, changes)
        outcome.updated.append(label)
    else:
        outcome.unchanged += 1
    models = entry.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise InitFileError(f"{where}.models must be a list of mappings")
    for i, model in enumerate(models):
        _model(row, model, f"{where}.models[{i}]", outcome)


def _model(provider: Provider, entry: dict, where: str, outcome: Outcome) -> None:
    data = _checked(
        where, registry.model_fields, {**entry, "providerId": provider.id}, required=True
    )
    row = Model.get_or_none(
        (Model.provider == provider)
        & (Model.system_name == data["system_name"])
        & (Model.deleted == False)  # noqa: E712  (deleted ones may share the name)
    )
    label = f"model {provider.name}/{data['system_name']}"
    if row is None:
        _checked(where, registry.add_model, data)  # brings a deleted one back
        outcome.created.append(label)
        return
    data.pop("provider_id")
    if changes := _changes(row, data):
        _checked(where, registry.edit_model, row, changes)
        outcome.updated.append(label)
    else:
        outcome.unchanged += 1


def _key(entry: dict, where: str, outcome: Outcome) -> None:
    body = {k: v for k, v in entry.items() if k not in ("key", "revoked")}
    data = _checked(where, registry.key_fields, body)
    if "revoked" in entry:
        if not isinstance(entry["revoked"], bool):
            raise InitFileError(f"{where}: revoked must be true or false")
        data["revoked"] = entry["revoked"]
    value = entry.get("key")
    if value is not None:
        if not isinstance(value, str) or not registry.FORCED_KEY.fullmatch(value):
            raise InitFileError(f"{where}: key must be sk- and 32 lowercase hex digits")
        row = ApiKey.by_key(value)
        label = f"key {redact.hint(value)}"
    else:
        if not data.get("comment"):
            raise InitFileError(f"{where}: a key without a value needs a comment to be found by")
        row = ApiKey.get_or_none((ApiKey.source == "init") & (ApiKey.comment == data["comment"]))
        label = f"key '{data['comment']}'"
    if row is None:
        if value is None:
            row, value = registry.issue_key(data, source="init")
            outcome.new_keys[data["comment"]] = value
        else:
            _checked(where, registry.adopt_key, value, data, source="init")
        outcome.created.append(label)
    elif changes := _changes(row, data):
        registry.edit_key(row, changes)
        outcome.updated.append(label)
    else:
        outcome.unchanged += 1
