"""Per-model limits: which identifiers limit a call, and how every worker learns of them.

The matching rules on limits held in memory; then the table, reloaded in the background
when a change is announced (the limiter's key-change channel) and kept as last read
when the database does not answer. The admin API's CRUD: tests/test_admin_api.py; the
limits applied to calls: tests/test_admission.py.
"""

from __future__ import annotations

import gevent

from gateway import model_limits as module
from gateway.limiter import limiter
from gateway.model_limits import CHANGED, ModelLimits
from gateway.models import RateLimit
from tests.servers import wait_until


def held(**limits: tuple[int, float]) -> ModelLimits:
    out = ModelLimits()
    out.ttl = 1e9  # no reload: these limits only
    out._limits = {name.replace("__", "@"): value for name, value in limits.items()}
    out._loaded_at = float("inf")
    return out


def names(limits: ModelLimits, model: str) -> list[tuple[str, float, float]]:
    return [(b.name, b.capacity, b.rate) for b in limits.buckets(model)]


def test_nothing_is_limited_unless_configured() -> None:
    assert names(held(), "gpt-4o") == []
    assert names(held(other=(1, 1.0)), "gpt-4o@openai") == []


def test_the_model_as_sent_and_its_system_name_both_limit() -> None:
    limits = held(gpt=(10, 1.0), gpt__openai=(2, 0.5))
    assert names(limits, "gpt") == [("model:gpt", 10, 1.0)]
    assert names(limits, "gpt@openai") == [("model:gpt@openai", 2, 0.5), ("model:gpt", 10, 1.0)]
    assert names(limits, "gpt@azure") == [("model:gpt", 10, 1.0)]  # no escape by pinning


def test_default_limits_only_models_without_a_limit_of_their_own() -> None:
    limits = held(default=(5, 0.1), gpt=(10, 1.0))
    assert names(limits, "claude") == [("model:default", 5, 0.1)]
    assert names(limits, "gpt@x") == [("model:gpt", 10, 1.0)]


def test_a_change_announced_elsewhere_is_reloaded_in_the_background(db, app) -> None:  # type: ignore[no-untyped-def]
    limits = ModelLimits()
    limits.init_app(app)
    limits.ttl = 1e9  # only announcements make it reload
    limiter.on_key_change(limits.changed)
    try:
        limits.reload()
        assert limits.buckets("m") == []
        RateLimit.create(identifier="m", limit=3, refill=1.0)  # written by another instance
        limiter.announce("a key hash")  # not about these limits
        gevent.sleep(0.05)
        assert limits.buckets("m") == []
        limiter.announce(CHANGED)
        wait_until(lambda: limits.buckets("m"), timeout=5)
        RateLimit.delete().execute()
        limits.changed(None)  # announcements may have been missed: reload
        wait_until(lambda: not limits.buckets("m"), timeout=5)
    finally:
        limiter._changes._listeners.remove(limits.changed)
        assert limits.wait(5)


def test_a_reload_that_fails_keeps_the_limits_last_read(db, app, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    RateLimit.create(identifier="m", limit=3, refill=1.0)
    limits = ModelLimits()
    limits.init_app(app)
    limits.reload()

    def away() -> None:
        raise OSError("database away")

    monkeypatch.setattr(module, "connection", away)
    limits.ttl = 0
    assert len(limits.buckets("m")) == 1  # asks for a reload, answers from memory
    wait_until(lambda: "keeping the last ones" in caplog.text, timeout=5)
    assert len(limits.buckets("m")) == 1
    assert limits.wait(5)
