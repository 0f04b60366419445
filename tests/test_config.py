"""What each setting may be: a wrong one stops the start with a line naming it.

``config.problems`` is checked against the defaults, against values on each side of
every rule's bound, and (hypothesis) against any text an environment variable can hold:
it names the variable exactly when the value is not a number, word or switch the knob
takes. What it lets through at a bound, the app takes (a fresh process builds one with
all of them). And a real gunicorn given a wrong value exits at once with the line,
before it forks or prepares anything, and takes what the rules let through.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import SettingsError, create_app
from gateway.config import DEFAULTS, RULES, UNPREFIXED, from_environment, problems
from tests.servers import ROOT, Gateway, children, free_port

SECONDS_ABOVE_0 = [n for n, r in RULES.items() if r(0) and r(0.001) is None]
SECONDS_FROM_0 = [n for n, r in RULES.items() if r(0) is None and r(0.5) is None and r(-1)]
COUNTS = [n for n, r in RULES.items() if r(0.5) and r(-0.5) and r(7) is None]
WORDS = ["ON_DISCONNECT", "LOG_LEVEL", "SRV_LOG_LEVEL", "OTEL_EXPORT"]
FLAGS = ["RECORDER_AHEAD"]  # true or false (JSON), 1 or 0
SHARES = {"LIMIT_LEASE_SHARE": 0.1}  # a number from 0 to the most


def variable(name: str) -> str:
    return name if name in UNPREFIXED else f"GATEWAY_{name}"


def named(name: str, environ: dict[str, str]) -> bool:
    """Whether ``problems`` names ``name``'s variable for this environment."""
    return any(
        line.startswith(variable(name) + "=") for line in problems(from_environment(environ))
    )


def test_every_knob_with_a_number_has_a_rule_and_every_default_keeps_it() -> None:
    assert problems(DEFAULTS) == []
    for name, value in DEFAULTS.items():
        if isinstance(value, (int, float)):
            assert name in RULES, f"{name} has no rule"
    kinds = SECONDS_ABOVE_0 + SECONDS_FROM_0 + COUNTS + WORDS + FLAGS + list(SHARES)
    assert sorted(kinds) == sorted(RULES)


@pytest.mark.parametrize(
    ("text", "wrong"),
    [
        ("15m", True),
        ("30s", True),
        ("", True),
        ("true", True),  # a switch is not a number
        ("NaN", True),
        ("Infinity", True),
        ("[30]", True),
        ('"30"', True),  # JSON text, not a number
        ("-1", True),
        ("0", True),
        ("0.001", False),
        ("30", False),
        ("1e3", False),
    ],
)
def test_a_timeout_must_be_seconds_above_0(text: str, wrong: bool) -> None:
    assert named("CALL_TIMEOUT", {"GATEWAY_CALL_TIMEOUT": text}) is wrong
    if wrong:
        (line,) = problems(from_environment({"GATEWAY_CALL_TIMEOUT": text}))
        assert line.endswith("it must be a number of seconds above 0"), line


@pytest.mark.parametrize(
    ("name", "text", "wrong"),
    [
        ("WORKERS", "two", True),
        ("WORKERS", "0", True),
        ("WORKERS", "2.5", True),
        ("WORKERS", "2.0", False),  # a whole number, written as JSON may write it
        ("WORKERS", "4", False),
        ("MAX_DRAINS", "0", False),
        ("MAX_DRAINS", "-1", True),
        ("PORT", "0", False),
        ("PORT", "65535", False),
        ("PORT", "65536", True),
        ("CACHE_TTL", "0", False),
        ("RECORDER_WRITERS", "", False),
        ("RECORDER_WRITERS", "null", False),
        ("RECORDER_WRITERS", "-2", True),
        ("RETENTION_DAYS", "", False),
        ("RETENTION_DAYS", "0", False),
        ("RETENTION_DAYS", "0.5", False),
        ("RETENTION_DAYS", "a week", True),
        ("SWEEP_AFTER", "0", True),
        ("ON_DISCONNECT", "DRAIN", False),
        ("ON_DISCONNECT", "maybe", True),
        ("LOG_LEVEL", "info", False),
        ("LOG_LEVEL", "loud", True),
        ("SRV_LOG_LEVEL", "OFF", False),
        ("OTEL_EXPORT", "yes", False),
        ("OTEL_EXPORT", "sometimes", True),
    ],
)
def test_each_kind_of_rule_at_its_bounds(name: str, text: str, wrong: bool) -> None:
    assert named(name, {variable(name): text}) is wrong


def test_port_and_host_are_read_without_the_prefix() -> None:
    assert named("PORT", {"PORT": "http"})
    assert not named("PORT", {"GATEWAY_PORT": "http"})  # not read by gunicorn.conf.py


LEVELS = {"debug", "info", "warning", "error", "critical"}
# The words each such knob takes, in any case, as the test reads the readers.
TAKEN = {
    "ON_DISCONNECT": {"drain", "cancel"},
    "LOG_LEVEL": LEVELS,
    "SRV_LOG_LEVEL": LEVELS | {"off", ""},
    "OTEL_EXPORT": {"true", "false", "1", "0", "yes", "no", "on", "off", ""},
}


def _takes(name: str, value: object) -> bool:
    """The test's own reading of what a knob takes: the rules, said another way."""
    if name == "OTEL_EXPORT":
        if value is None or (value in (0, 1) and not isinstance(value, float)):
            return True
        return isinstance(value, str) and value.strip().lower() in TAKEN[name]
    if name in TAKEN:
        return isinstance(value, str) and value.lower() in TAKEN[name]
    if name in FLAGS:
        return value in (0, 1) and not isinstance(value, float)
    if value is None or value == "":
        return DEFAULTS[name] is None  # the optional ones
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        if not math.isfinite(float(value)):
            return False
    except OverflowError:  # past what a float holds: no setting's number
        return False
    if name in SHARES:
        return 0 <= value <= SHARES[name]
    if name in COUNTS:
        least = 1 if RULES[name](0) else 0
        return float(value).is_integer() and least <= value <= (65535 if name == "PORT" else value)
    return value > 0 if name in SECONDS_ABOVE_0 else value >= 0


ENV_TEXT = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),
    st.sampled_from(
        ["true", "false", "null", "[]", "{}", '"5"', " 5 ", "5.0", "1e309", "-0", "9" * 400]
    ),
)


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(sorted(RULES)), text=ENV_TEXT)
def test_any_environment_text_is_named_exactly_when_the_knob_cannot_take_it(
    name: str, text: str
) -> None:
    environ = {variable(name): text}
    (value,) = from_environment(environ).values()
    assert named(name, environ) is not _takes(name, value)


def test_create_app_names_every_wrong_value_at_once(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as refused:
        create_app(
            {
                "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
                "CALL_TIMEOUT": "15m",
                "RECORDER_BATCH": 0,
                "ON_DISCONNECT": "later",
            }
        )
    lines = str(refused.value).splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "GATEWAY_ON_DISCONNECT",
        "GATEWAY_CALL_TIMEOUT",
        "GATEWAY_RECORDER_BATCH",
    ]


def _bound(name: str) -> object:
    """The least value a knob's rule lets through."""
    if name in WORDS:
        return {"ON_DISCONNECT": "Cancel", "OTEL_EXPORT": "off"}.get(name, "warning")
    if name in SECONDS_ABOVE_0:
        return 0.001
    return 0 if RULES[name](0) is None else 1


def test_what_the_rules_let_through_at_their_bounds_the_app_takes(tmp_path: Path) -> None:
    """Every knob at the least it may be, then at a large value, in a fresh process that
    builds the app (unpatched, so no greenlet starts: only the settings are read)."""
    for values in (
        {name: _bound(name) for name in RULES},
        {
            name: 10**9 if name != "PORT" else 65535
            for name in COUNTS + SECONDS_FROM_0 + SECONDS_ABOVE_0
        },
    ):
        environ = {
            **os.environ,
            "GATEWAY_INSTANCE_PATH": str(tmp_path),
            "GATEWAY_DATABASE_URL": json.dumps(f"sqlite:///{tmp_path / 'gateway.db'}"),
            **{
                variable(n): json.dumps(v) if not isinstance(v, str) else v
                for n, v in values.items()
            },
            "GATEWAY_PORT": "8080",  # PORT itself is gunicorn.conf.py's
        }
        built = subprocess.run(
            [sys.executable, "-c", "from gateway import create_app; create_app(); print('built')"],
            cwd=ROOT,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert built.returncode == 0 and "built" in built.stdout, built.stderr[-2000:]


def test_gunicorn_given_a_wrong_value_exits_at_once_naming_it(tmp_path: Path) -> None:
    environ = {
        **os.environ,
        "GATEWAY_INSTANCE_PATH": str(tmp_path),
        "PORT": str(free_port()),
        "GATEWAY_WORKERS": "two",
        "GATEWAY_LOG_BACKLOG": "1MB",
    }
    started = time.monotonic()
    gunicorn = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gunicorn.returncode == 1
    assert time.monotonic() - started < 10
    assert gunicorn.stderr.splitlines() == [
        "The gateway cannot start:",
        "GATEWAY_WORKERS='two' is wrong: it must be a whole number from 1",
        "GATEWAY_LOG_BACKLOG='1MB' is wrong: it must be a whole number from 0",
    ]
    assert list(tmp_path.iterdir()) == []  # nothing prepared: no database, no secret


def test_gunicorn_reads_its_numbers_as_the_app_does(tmp_path: Path) -> None:
    """Whole numbers written as JSON writes them (``1.0``, ``1e6``) and levels in any
    case are what the rules let through, so gunicorn.conf.py takes them too."""
    gw = Gateway(
        f"sqlite:///{tmp_path / 'gateway.db'}",
        tmp_path / "instance",
        GATEWAY_WORKERS="1.0",
        GATEWAY_MAX_REQUESTS="1e3",
        GATEWAY_LOG_BACKLOG="1e6",
        GATEWAY_LOG_LEVEL="info",
        GATEWAY_ON_DISCONNECT="Cancel",
    )
    try:
        assert requests.get(f"{gw.url}/healthz", timeout=10).status_code == 200
        assert len(children(gw.proc.pid)) == 1
    finally:
        gw.stop()
