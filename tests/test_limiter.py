"""The worker's limiter: decisions, calls in flight, throttling, announcements, failing open.

Two ``Limiter`` objects on one redis-server stand for two workers (or two instances):
whatever one takes, the other sees. The test's own redis-server is stopped, paused and
restarted to show that every operation fails open, is counted and warned about once a
minute, and that limits hold again as soon as Redis answers.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import gevent
import pytest
from gevent import monkey

from gateway import failopen, keychanges, metrics
from gateway import limiter as limiter_module
from gateway.errors import BudgetExceeded
from gateway.failopen import KEEP_BATCH
from gateway.keychanges import resubscribe_wait
from gateway.leases import LEASE_TTL
from gateway.limiter import Limiter, model_bucket
from tests.servers import RedisServer, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _on(url: str | None, prefix: str, **config: object) -> Limiter:
    limiter = Limiter()
    limiter.configure({"REDIS_URL": url, "REDIS_PREFIX": prefix, "REDIS_TIMEOUT": 0.05, **config})
    return limiter


@pytest.fixture
def pair(shared_redis: RedisServer):  # type: ignore[no-untyped-def]
    """Two workers' limiters on one Redis, under a prefix of their own."""
    prefix = uuid.uuid4().hex[:8]
    a, b = _on(shared_redis.url, prefix), _on(shared_redis.url, prefix)
    yield a, b
    a.stop()
    b.stop()


def test_in_process_admission_headers_and_retry_after() -> None:
    clock = Clock()
    limiter = Limiter()
    limiter.configure({}, clock=clock)
    answers = [limiter.admit(1, rpm=20, tpm=50_000) for _ in range(40)]
    assert sum(a.allowed for a in answers) == 20
    refused = answers[-1]
    assert (refused.limit_type, refused.retry_after) == ("rpm", 3)
    assert refused.headers() == {
        "X-RateLimit-Limit-RPM": "20",
        "X-RateLimit-Remaining-RPM": "0",
        "X-RateLimit-Limit-TPM": "50000",
        "X-RateLimit-Remaining-TPM": "50000",
    }
    clock.now += 3
    assert limiter.admit(1, rpm=20, tpm=50_000).allowed
    assert limiter.admit(2, rpm=None, tpm=0).headers() == {}  # no limits, no headers


def test_a_global_rpm_limit_holds_across_workers(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    answers = [(a if i % 2 else b).admit(7, rpm=20, tpm=50_000) for i in range(40)]
    assert 20 <= sum(x.allowed for x in answers) <= 21  # 21 at most: refill during the burst
    assert not answers[-1].allowed and answers[-1].retry_after >= 1


def test_tpm_charged_by_one_worker_refuses_in_the_other(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert a.admit(8, rpm=50, tpm=1000).allowed
    a.charge(8, tpm=1000, tokens=5000)  # a huge call: a debt of 4000
    refused = b.admit(8, rpm=50, tpm=1000)
    assert (refused.allowed, refused.limit_type) == (False, "tpm")
    assert 239 <= refused.retry_after <= 241
    usage = b.usage(8, rpm=50, tpm=1000)
    assert usage["rpm"] == {"current": 1, "limit": 50, "remaining": 49}
    assert usage["tpm"]["remaining"] == 0 and 4999 <= usage["tpm"]["current"] <= 5000


def test_a_finished_call_s_dues_are_sent_not_waited_for(shared_redis: RedisServer) -> None:
    """``finish`` returns once its operations are written (a JSON call's answer goes
    then), not when Redis has answered; Redis runs them before what either worker asks
    after, and this worker's next round trip reads their replies."""
    prefix = uuid.uuid4().hex[:8]
    a, b = (_on(shared_redis.url, prefix, REDIS_TIMEOUT=2.0) for _ in "ab")
    assert a.admit(5, rpm=50, tpm=1000, slot=("call-1", 1)).allowed
    shared_redis.command("CLIENT", "PAUSE", "400")
    started = time.monotonic()
    a.finish(5, "call-1", tpm=1000, tokens=5000, nanos=7)
    assert time.monotonic() - started < 0.2
    assert b.admit(5, rpm=50, tpm=None, slot=("call-2", 1)).allowed  # the slot came back
    refused = b.admit(5, rpm=50, tpm=1000)
    assert (refused.allowed, refused.limit_type) == (False, "tpm")  # the tokens were charged
    assert a.spent(5) == 7
    assert not a.store._conns._owed  # the replies were read
    counted = _fail_opens("finish")
    shared_redis.command("CLIENT", "PAUSE", "300")
    a.configure({"REDIS_URL": shared_redis.url, "REDIS_PREFIX": prefix, "REDIS_TIMEOUT": 0.05})
    a.finish(5, "call-2", tpm=1000, tokens=1, nanos=1)
    try:
        assert a.usage(5, rpm=50, tpm=1000)["rpm"]["remaining"] == 50  # failed open: timed out
        assert _fail_opens("finish") == counted + 1  # so did the finish it came after
    finally:
        shared_redis.command("CLIENT", "UNPAUSE")  # the session's Redis: for the next tests


def test_a_per_model_limit_applies_beside_the_key_limits(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    per_model = [model_bucket("gpt-4o@openai", 2, 0.5)]
    answers = [x.admit(9, 100, 10_000, per_model) for x in (a, b, a)]
    assert [x.allowed for x in answers] == [True, True, False]
    assert answers[-1].limit_type == "model:gpt-4o@openai"
    assert answers[-1].rpm_remaining == 98  # the refused call took nothing


def test_slots_of_a_live_worker_stay_and_of_a_killed_one_lapse(shared_redis: RedisServer) -> None:
    prefix = uuid.uuid4().hex[:8]
    a = _on(shared_redis.url, prefix, INFLIGHT_TTL=0.6)
    b = _on(shared_redis.url, prefix, INFLIGHT_TTL=0.6)
    a.start()  # its keeper refreshes every 0.2 s
    try:
        assert a.enter(3, "call-a", max_concurrent=1)
        assert not b.enter(3, "call-b", max_concurrent=1)
        gevent.sleep(1.2)  # twice the TTL: kept alive by a's keeper
        assert not b.enter(3, "call-b", max_concurrent=1)
        a.leave(3, "call-a")
        assert b.enter(3, "call-b", max_concurrent=1)
        b.leave(3, "call-b")
        assert a.enter(3, "call-c", max_concurrent=1)
        a.stop()  # killed mid-call: nobody refreshes or releases call-c
        assert not b.enter(3, "call-d", max_concurrent=1)
        wait_until(lambda: b.enter(3, "call-d", max_concurrent=1), timeout=2)
    finally:
        a.stop()


def test_request_claims_are_exclusive_and_lapse_with_their_worker(
    shared_redis: RedisServer,
) -> None:
    prefix = uuid.uuid4().hex[:8]
    a = _on(shared_redis.url, prefix, INFLIGHT_TTL=0.6)
    b = _on(shared_redis.url, prefix, INFLIGHT_TTL=0.6)
    a.start()
    try:
        assert a.claim(4, "req-1", "uid-a") is None
        gevent.sleep(1.0)
        holder = b.claim(4, "req-1", "uid-b")
        assert holder.uid == "uid-a" and holder.age >= 0.9  # for Retry-After and started_at
        assert b.claim(5, "req-1", "uid-b") is None  # scoped per key
        a.unclaim(4, "req-1", "uid-a")
        assert b.claim(4, "req-1", "uid-b") is None
        b.unclaim(4, "req-1", "uid-b")
        assert a.claim(4, "req-2", "uid-c") is None
        a.stop()  # killed: the claim lapses
        wait_until(lambda: b.claim(4, "req-2", "uid-d") is None, timeout=2)
    finally:
        a.stop()


def test_the_keeper_refreshes_a_worker_s_slots_and_claims_in_batches(
    shared_redis: RedisServer,
) -> None:
    """1,500 calls in flight: a round trip keeps KEEP_BATCH of them (100: 15 round trips)."""
    prefix = uuid.uuid4().hex[:8]
    a, b = (_on(shared_redis.url, prefix, INFLIGHT_TTL=4.0, REDIS_TIMEOUT=2.0) for _ in "ab")
    started = time.monotonic()
    for i in range(1200):
        assert a.enter(20 + i % 3, f"call-{i}", max_concurrent=400)
    for i in range(300):
        assert a.claim(30, f"req-{i}", f"uid-{i}") is None
    a.leave(21, "call-1")  # given back: the keeper must not take it again
    entered = time.monotonic()
    gevent.sleep(1.0)
    sent = _round_trips(a)
    a.keep_in_flight()
    assert time.monotonic() - started < 4.0, "too slow to refresh before the first TTL"
    assert sum(sent) == 1499 and len(sent) == math.ceil(1499 / KEEP_BATCH)
    gevent.sleep(max(0.0, entered + 4.3 - time.monotonic()))  # every first TTL is over
    assert not b.enter(20, "late", max_concurrent=400)  # kept by the refresh
    assert b.enter(21, "late", max_concurrent=400)  # call-1's place, and only that
    assert not b.enter(21, "later", max_concurrent=400)
    assert all(b.claim(30, f"req-{i}", "other").uid == f"uid-{i}" for i in (0, 150, 299))


def test_wrong_secrets_are_throttled_per_address_and_right_ones_are_not(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    for _ in range(50):  # right secrets give their try back
        assert a.attempt("10.0.0.1") == 0
        a.succeeded("10.0.0.1")
    waits = [(a if i % 2 else b).attempt("10.0.0.1") for i in range(12)]
    assert waits[:10] == [0] * 10
    assert 5 <= waits[10] <= 6  # 10 per minute: one back every 6 s
    assert a.attempt("10.0.0.2") == 0  # another address
    assert a.attempt("::1") == 0
    assert a.key("addr:{x}", "auth") == f"{a.prefix}:{{addr:(x)}}:auth"  # one hash tag only


def test_a_key_change_reaches_every_worker_at_once(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    heard: list[str | None] = []
    b.on_key_change(heard.append)
    b.start()
    wait_until(lambda: (a.announce("warm-up"), heard)[1], timeout=5)  # subscribed
    heard.clear()
    started = time.monotonic()
    a.announce("hash-of-a-revoked-key")
    wait_until(lambda: "hash-of-a-revoked-key" in heard, timeout=2, interval=0.005)
    assert time.monotonic() - started < 0.5


def test_a_key_change_redis_did_not_take_is_announced_once_it_answers(
    redis_server: RedisServer,
) -> None:
    # A change announced while Redis stalled (frozen, slow past REDIS_TIMEOUT) failed
    # open and was never sent again: the other workers, whose subscriptions never
    # broke (so nothing told them they had missed one), served the key as it was (a
    # revoked key, old limits) until GATEWAY_CACHE_TTL.
    url = redis_server.url
    w, c, b = (_on(url, "an", REDIS_RETRY_AFTER=0.2) for _ in "wcb")
    heard: list[str | None] = []
    b.on_key_change(heard.append)
    b.start()
    try:
        wait_until(lambda: (w.announce("warm-up"), heard)[1], timeout=5)  # subscribed
        gevent.sleep(0.2)
        heard.clear()
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            c.announce("hash-of-a-changed-key")  # fails open: Redis does not answer
            gevent.sleep(0.3)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        wait_until(lambda: "hash-of-a-changed-key" in heard, timeout=3, interval=0.01)
        assert heard.count(None) == 0, "b's subscription never broke"
        wait_until(lambda: not c._changes._unannounced, timeout=2)
    finally:
        for limiter in (w, c, b):
            limiter.stop()


def test_a_subscription_that_stops_answering_is_made_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A subscriber only reads: its connection gone silent (a partition, a NAT or load
    # balancer dropping it while idle; here a frozen Redis) never failed, so the worker
    # never subscribed again and heard no key change from then on, with nothing to tell
    # it that it missed them (revoked keys and new limits waited for CACHE_TTL).
    from gateway.ratelimit import Subscription

    monkeypatch.setattr(Subscription, "PING_EVERY", 0.2, raising=False)
    w, b = (_on(redis_server.url, "sl", REDIS_RETRY_AFTER=0.2) for _ in "wb")
    heard: list[str | None] = []
    b.on_key_change(heard.append)
    b.start()
    try:
        wait_until(lambda: (w.announce("warm-up"), heard)[1], timeout=5)  # subscribed
        gevent.sleep(0.5)  # pings answered meanwhile: nothing is missed
        assert None not in heard
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: b._changes._subscription is None, timeout=3, interval=0.01)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        wait_until(lambda: None in heard, timeout=3, interval=0.01)  # missed: forget all
        heard.clear()
        w.announce("hash-of-a-changed-key")
        wait_until(lambda: "hash-of-a-changed-key" in heard, timeout=2, interval=0.01)
    finally:
        w.stop()
        b.stop()


def test_the_listener_tries_again_soon_then_backs_off_to_retry_after() -> None:
    # A store back within a blip is heard within 50 ms; a dead Redis is tried 4 more
    # times in its first 1.5 s, then once per REDIS_RETRY_AFTER as before; the local
    # instance store (a connect refused at once) every 0.1 s.
    assert [resubscribe_wait(n, 1.0) for n in range(1, 8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1, 1]
    assert [resubscribe_wait(n, 0.1) for n in (1, 2, 3, 20)] == [0.05, 0.1, 0.1, 0.1]


@pytest.mark.parametrize("held", [0, 1100])
def test_a_call_applies_the_key_changes_already_at_its_worker_s_door(
    pair, shared_redis: RedisServer, held: int, request: pytest.FixtureRequest
) -> None:  # type: ignore[no-untyped-def]
    """A change Redis has written to this worker, but whose listener has not run yet (the
    loop ran a call's greenlet first), is applied by ``catch_up`` before the call looks
    at its key: on a loaded machine a revoked key was let through otherwise. Also in a
    worker whose subscription's descriptor is past 1023 (``held`` sockets open before
    it), where ``select`` refuses to look."""
    a, b = pair
    heard: list[str | None] = []
    b.on_key_change(heard.append)
    sockets = [socket.socket() for _ in range(held)]
    request.addfinalizer(lambda: [sock.close() for sock in sockets])
    b.start()
    wait_until(lambda: (a.announce("warm-up"), heard)[1], timeout=5)  # subscribed
    gevent.sleep(0.2)  # every warm-up heard
    heard.clear()
    b.catch_up()  # nothing waits: it returns at once
    # Published through a socket of the OS's, not gevent's: no switch, so b's listener
    # cannot run until this greenlet lets it.
    raw = monkey.get_original("socket", "socket")()
    try:
        raw.connect(("127.0.0.1", shared_redis.port))
        channel = a.channel.encode()
        raw.sendall(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$4\r\nhash\r\n" % (len(channel), channel))
        assert raw.recv(100) == b":1\r\n"  # b's listener is the one subscriber
        raw.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert raw.recv(100) == b"+PONG\r\n"  # so the message is written to b's socket
    finally:
        raw.close()
    assert heard == []  # at b's door, not applied
    b.catch_up()
    assert heard == ["hash"]
    b.stop()  # a call never waits for a listener that is gone
    assert b._changes._subscription is None


def test_without_redis_only_this_worker_hears_its_announcements() -> None:
    limiter = Limiter()
    heard: list[str | None] = []
    limiter.on_key_change(heard.append)
    limiter.announce("h")
    assert heard == ["h"] and not limiter.shared


def test_a_slot_and_the_buckets_are_taken_together_or_not_at_all(
    shared_redis: RedisServer,
) -> None:
    """Ten calls of one key at once through two workers: maxConcurrent 2, RPM 3. Two get
    in; the eight refused for their slot take no request from RPM."""
    prefix = uuid.uuid4().hex[:8]
    a, b = (_on(shared_redis.url, prefix, REDIS_TIMEOUT=2.0) for _ in range(2))  # no fail-open
    calls = [gevent.spawn((a, b)[i % 2].admit, 5, 3, 1000, (), (f"call-{i}", 2)) for i in range(10)]
    gevent.joinall(calls, raise_error=True)
    answers = [c.value for c in calls]
    assert sum(x.allowed for x in answers) == 2
    assert {x.limit_type for x in answers if not x.allowed} == {"concurrency"}
    assert a.usage(5, 3, 1000)["rpm"]["remaining"] == 1
    for i, answer in enumerate(answers):
        if answer.allowed:
            (a, b)[i % 2].finish(5, f"call-{i}")  # the slots come back in one round trip each
    assert a.admit(5, 3, 1000, slot=("next", 2)).allowed  # the last request of the minute
    assert b.admit(5, 3, 1000, slot=("late", 2)).limit_type == "rpm"


def test_redis_away_fails_open_counted_warned_once_and_limits_come_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = _on(redis_server.url, "fo", REDIS_RETRY_AFTER=0.3)
    heard: list[str | None] = []
    limiter.on_key_change(heard.append)
    limiter.start()
    try:
        assert sum(limiter.admit(1, rpm=3, tpm=100).allowed for _ in range(5)) == 3
        counted = _fail_opens("admit")
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="gateway.limiter"):
            answers = [limiter.admit(1, rpm=3, tpm=100) for _ in range(20)]
        assert all(a.allowed and a.failed_open for a in answers)
        assert answers[0].headers()["X-RateLimit-Remaining-RPM"] == "3"
        assert limiter.fail_opens == 20 and _fail_opens("admit") == counted + 20
        assert len([r for r in caplog.records if "Redis unavailable" in r.message]) == 1
        limiter.charge(1, 100, 50)  # lost, not raised
        assert limiter.enter(1, "c", 1) and limiter.claim(1, "r", "u") is None
        assert limiter.admit(1, rpm=3, tpm=100, slot=("d", 1)).failed_open
        finished = _fail_opens("finish")
        limiter.finish(1, "c", req_id="r", answer="{}", tpm=100, tokens=50, nanos=10)  # lost too
        assert _fail_opens("finish") == finished + 1
        redis_server.start()  # restarted empty
        wait_until(lambda: not limiter.admit(2, rpm=1, tpm=100).failed_open, timeout=5)
        assert not limiter.admit(2, rpm=1, tpm=100).allowed  # the limit holds again
        wait_until(lambda: None in heard, timeout=5)  # the listener reconnected: forget all
    finally:
        limiter.stop()  # its listener would reconnect to a stopped Redis for good


def test_calls_in_flight_hold_their_slots_and_claims_again_after_redis_restarts_empty(
    redis_server: RedisServer,
) -> None:
    # The keeper only extended what Redis still had: after a restart the key's calls in
    # flight went uncounted (another call took the slot) and a repeat of a running
    # request id was made anew, for as long as those calls ran.
    a, b = (_on(redis_server.url, "rs", INFLIGHT_TTL=30.0, REDIS_TIMEOUT=2.0) for _ in "ab")
    try:
        assert a.enter(7, "running", max_concurrent=1)
        assert a.claim(7, "req-1", "running") is None
        assert a.enter(7, "done", max_concurrent=2) and a.claim(7, "req-2", "done") is None
        a.leave(7, "done")
        a.settle(7, "req-2", "done", None)  # over before the restart: given back
        redis_server.stop()
        redis_server.start()  # empty
        a.keep_in_flight()
        assert not b.enter(7, "next", max_concurrent=1), "the running call counts again"
        held = b.claim(7, "req-1", "repeat")
        assert held is not None and held.uid == "running" and held.answer is None
        assert b.enter(7, "next", max_concurrent=2), "one slot only: done's is not back"
        assert b.claim(7, "req-2", "repeat") is None, "done's claim is not back"
        a.leave(7, "running")
        assert b.enter(7, "after", max_concurrent=2)
    finally:
        a.stop()
        b.stop()


def test_a_claim_taken_again_after_redis_restarts_empty_keeps_its_start(
    redis_server: RedisServer,
) -> None:
    # A repeat's 409 says when the first call claimed the id (started_at) and how long
    # it may still run (Retry-After: NexusGate's estimate less its age). The claim taken
    # again after a restart started then: the running call's age was lost (a call
    # running for minutes said it had just started).
    a, b = (_on(redis_server.url, "ra", INFLIGHT_TTL=30.0, REDIS_TIMEOUT=2.0) for _ in "ab")
    try:
        assert a.claim(7, "req-1", "running") is None
        first = b.claim(7, "req-1", "repeat")
        assert first is not None and first.uid == "running"
        gevent.sleep(1.0)
        redis_server.stop()
        redis_server.start()  # empty
        a.keep_in_flight()
        held = b.claim(7, "req-1", "repeat")
        assert held is not None and held.uid == "running" and held.answer is None
        assert abs(held.started - first.started) < 0.2, "the first call's start, kept"
        assert held.age >= 0.9
    finally:
        a.stop()
        b.stop()


def test_what_a_frozen_redis_runs_late_is_given_back_once_it_answers(
    redis_server: RedisServer,
) -> None:
    # An admission and a claim written to a frozen Redis (SIGSTOP: it takes connections
    # and data, and answers nothing) time out, and their calls go on; their ends could
    # not be told to Redis either. Resumed, Redis ran them: a slot and a claim nobody
    # held refused the key's calls (429) and the id's repeats (409) for INFLIGHT_TTL.
    a, c, b = (_on(redis_server.url, "fz", REDIS_RETRY_AFTER=0.2) for _ in "acb")
    assert a.admit(1, rpm=5, tpm=100).allowed and c.admit(1, rpm=5, tpm=100).allowed
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:  # written on connections the workers keep: they reach Redis's sockets
        assert a.admit(9, rpm=100, tpm=1000, slot=("late-a", 1)).failed_open
        assert c.claim(9, "req-9", "late-c") is None  # failed open: the call is made
        a.finish(9, "late-a", tpm=1000, tokens=5)
        c.finish(9, "late-c", req_id="req-9", answer="kept", tpm=1000, tokens=5)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    # Redis ran what waited in its sockets: the late calls hold a slot and the id.
    wait_until(lambda: not b.enter(9, "other", max_concurrent=1), timeout=5)
    held = b.claim(9, "req-9", "repeat")
    assert held is not None and held.uid == "late-c" and held.answer is None
    # With no call of their own, a and c give them back once Redis answers: within
    # REDIS_RETRY_AFTER (calls admitted by other workers must not wait for theirs).
    wait_until(lambda: b.enter(9, "next", max_concurrent=1), timeout=2)
    # A repeat gets the stored answer.
    wait_until(lambda: getattr(b.claim(9, "req-9", "repeat"), "answer", None) == "kept", 2)
    assert not a._guard.owed and not c._guard.owed
    a.stop()
    c.stop()


def test_give_backs_posted_on_a_connection_redis_closed_are_sent_again(
    redis_server: RedisServer,
) -> None:
    # CLIENT KILL (a failover, a proxy restarted): the finished call's give-backs were
    # written on the closed connection, found lost by the next round trip, and dropped.
    a, b = (_on(redis_server.url, "ck") for _ in "ab")
    assert a.admit(9, rpm=100, tpm=1000, slot=("done", 1)).allowed
    assert a.claim(9, "req-9", "done") is None
    redis_server.command("CLIENT", "KILL", "TYPE", "normal")
    a.finish(9, "done", req_id="req-9", answer="kept", tpm=1000, tokens=5)
    # The round trip that finds them lost sends them again first, on a new connection.
    assert a.admit(9, rpm=100, tpm=1000, slot=("next", 1)).allowed
    held = b.claim(9, "req-9", "repeat")
    assert held is not None and held.answer == "kept"


def test_a_slow_redis_fails_open_within_the_timeout(redis_server: RedisServer) -> None:
    limiter = _on(redis_server.url, "slow")
    assert limiter.admit(1, rpm=5, tpm=100).allowed
    pause = subprocess.Popen(["redis-cli", "-p", str(redis_server.port), "CLIENT", "PAUSE", "700"])
    pause.wait()
    started = time.monotonic()
    answer = limiter.admit(1, rpm=5, tpm=100)
    assert answer.allowed and answer.failed_open
    assert time.monotonic() - started < 0.4  # REDIS_TIMEOUT is 0.05 s
    started = time.monotonic()  # for REDIS_RETRY_AFTER, calls do not wait on Redis at all
    assert all(limiter.admit(1, rpm=5, tpm=100).failed_open for _ in range(20))
    assert time.monotonic() - started < 0.2


def test_a_warning_at_start_when_limits_are_per_process(caplog: pytest.LogCaptureFixture) -> None:
    limiter = Limiter()
    with caplog.at_level(logging.WARNING, logger="gateway.limiter"):
        limiter.init_app(SimpleNamespace(config={"REDIS_URL": None}))
    limiter.stop()
    assert "REDIS_URL is not set" in caplog.text


def _fail_opens(operation: str) -> float:
    return metrics.FAIL_OPENS.labels(operation)._value.get()


# -- monthly budgets -------------------------------------------------------------------

JUNE_END = datetime(2026, 6, 30, 23, 59, tzinfo=UTC)


def _admit(limiter: Limiter, key_id: int, budget: float | None, now: datetime, **limits):  # type: ignore[no-untyped-def]
    """Admit a call of a key with a budget (and RPM 5, TPM 1000 unless told)."""
    limits = {"rpm": 5, "tpm": 1000, **limits}
    return limiter.admit(key_id, limits["rpm"], limits["tpm"], budget=budget, now=now)


def _budget_holds_then_resets(a: Limiter, b: Limiter) -> None:
    assert _admit(b, 9, 1.0, JUNE_END).allowed  # nothing spent yet
    a.spend(9, 600_000_000, JUNE_END)
    b.spend(9, 400_000_000, JUNE_END)  # $1.00 in all, from two workers
    with pytest.raises(BudgetExceeded) as info:
        _admit(a, 9, 1.0, JUNE_END)
    assert (info.value.status, info.value.retry_after) == (402, 60)  # until July
    assert "spent $1.000000 of its $1 budget for June 2026 (UTC)" in info.value.message
    assert _admit(b, 9, 1.000000001, JUNE_END).allowed  # a nano-dollar more lets it through
    assert _admit(b, 9, None, JUNE_END).allowed  # and so does none
    with pytest.raises(BudgetExceeded):  # a key with a budget and no other limit
        _admit(b, 9, 0.5, JUNE_END, rpm=None, tpm=None)
    assert _admit(a, 9, 1.0, JUNE_END + timedelta(minutes=1)).allowed  # July: nothing spent
    a.spend(9, None, JUNE_END)  # an unpriced call changes nothing
    assert a.spent(9, JUNE_END) == b.spent(9, JUNE_END) == 1_000_000_000


def _a_budget_refusal_takes_nothing(limiter: Limiter) -> None:
    limiter.spend(12, 2_000_000_000, JUNE_END)
    for i in range(4):  # RPM 2, one slot: refused for the budget each time, never for them
        with pytest.raises(BudgetExceeded):
            limiter.admit(12, 2, 1000, slot=(f"call-{i}", 1), budget=2.0, now=JUNE_END)
    assert limiter.usage(12, 2, 1000)["rpm"]["remaining"] == 2
    july = JUNE_END + timedelta(minutes=1)
    assert limiter.admit(12, 2, 1000, slot=("first", 1), budget=2.0, now=july).allowed
    refused = limiter.admit(12, 2, 1000, slot=("second", 1), budget=2.0, now=july)
    assert refused.limit_type == "concurrency"  # the slot was free until "first" took it


def test_a_budget_refusal_takes_no_request_and_no_slot(pair) -> None:  # type: ignore[no-untyped-def]
    _a_budget_refusal_takes_nothing(pair[0])


def test_a_budget_refusal_takes_nothing_in_process_memory() -> None:
    _a_budget_refusal_takes_nothing(Limiter())


def test_the_budget_is_asked_in_the_admission_s_round_trip(pair) -> None:  # type: ignore[no-untyped-def]
    a, _ = pair
    a.spend(13, 1, JUNE_END)
    a.admit(13, 5, 1000)  # the script is loaded (a Redis that lost it loads it on first use)
    before = _evalsha_calls(a)
    assert a.admit(13, 5, 1000, slot=("call", 2), budget=1.0, now=JUNE_END).allowed
    assert _evalsha_calls(a) - before == 1


def _round_trips(limiter: Limiter) -> list[int]:
    """How many scripts each of the limiter's round trips to Redis carries, from now on."""
    sent: list[int] = []
    scripts = limiter.store._scripts

    def counted(calls):  # type: ignore[no-untyped-def]
        sent.append(len(calls))
        return scripts(calls)

    limiter.store._scripts = counted
    return sent


def _evalsha_calls(limiter: Limiter) -> int:
    stats = limiter.store.client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_budget_spent_through_one_worker_refuses_in_the_other(pair) -> None:  # type: ignore[no-untyped-def]
    _budget_holds_then_resets(*pair)


def test_a_budget_in_process_memory() -> None:
    limiter = Limiter()
    _budget_holds_then_resets(limiter, limiter)


def test_spend_totals_stay_exact_past_what_a_lua_number_holds(pair) -> None:  # type: ignore[no-untyped-def]
    a, _ = pair
    a.spend(10, 2**60, JUNE_END)
    a.spend(10, 1, JUNE_END)
    assert a.spent(10, JUNE_END) == 2**60 + 1  # a double would say 2**60


def test_a_budget_fails_open_when_redis_is_away_unless_known_spent(
    redis_server: RedisServer,
) -> None:
    limiter = _on(redis_server.url, "fob", REDIS_RETRY_AFTER=0.3)
    limiter.spend(11, 5_000_000_000, JUNE_END)
    with pytest.raises(BudgetExceeded):
        _admit(limiter, 11, 1.0, JUNE_END)
    assert _admit(limiter, 12, 1.0, JUNE_END).allowed  # under its budget
    before = _fail_opens("admit")
    redis_server.stop()
    # The store said key 11 had spent $5 this month: a month's spend only grows, so it
    # stays refused (it was let through: a probe's key over its budget spent $7.60 in
    # the second Redis was away).
    with pytest.raises(BudgetExceeded, match=r"\$5\.000000 of its \$1 budget"):
        _admit(limiter, 11, 1.0, JUNE_END)
    assert _admit(limiter, 11, 10.0, JUNE_END).failed_open  # its budget raised since
    assert _admit(limiter, 12, 1.0, JUNE_END).failed_open  # allowed, counted, warned
    limiter.spend(12, 1, JUNE_END)  # lost, not raised
    assert _fail_opens("admit") > before


# -- leases (leases.py): a large limit's requests taken ahead ------------------------


def test_leases_admit_a_large_limit_s_calls_with_few_round_trips(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    trips = _round_trips(a), _round_trips(b)
    answers = []
    for i in range(3000):
        answers.append((a if i % 2 else b).admit(31, rpm=100_000, tpm=10**6))
        gevent.sleep(0)  # what a worker's calls do: the background asks for the leases
    assert all(x.allowed for x in answers)
    assert len(trips[0]) + len(trips[1]) <= 20  # leases of 1,000, not 3,000 round trips
    # Each worker reports the shared level plus what it holds unused; the other
    # worker's unused leases (two at most) count as used.
    assert all(100_000 - 3000 - 2 * 1000 <= x.rpm_remaining <= 100_000 for x in answers)
    # A lease still being asked for when its worker stops is lost, as a killed worker's
    # is (a loaded run once found 460 requests more): the ones held are what stop gives back.
    wait_until(lambda: not (a._holdings[31].asking or b._holdings[31].asking))
    a.stop()
    b.stop()  # both give back what they left unused, posted on their own connections
    # A round trip on b's connection runs after b's give-back (then a's after a's): read
    # on a's alone, b's could still be on its way (a loaded machine read 3,259 and 3,295).
    b.usage(31, 100_000, 10**6)
    assert a.usage(31, 100_000, 10**6)["rpm"]["current"] <= 3000


def test_leases_never_let_more_calls_through_than_the_limit(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    trips = _round_trips(a), _round_trips(b)
    started, allowed, before_a_refusal = time.monotonic(), 0, None
    for i in range(1500):
        if (a if i % 2 else b).admit(32, rpm=600, tpm=10**6).allowed:
            allowed += 1
        elif before_a_refusal is None:
            before_a_refusal = len(trips[0]) + len(trips[1])
        gevent.sleep(0)
    refilled = (time.monotonic() - started) * 600 / 60
    assert before_a_refusal is not None and before_a_refusal < 300  # leases of 6 were taken
    # Requests one worker held unused refuse the other's calls: two leases each at most.
    assert 600 - 2 * 2 * 6 <= allowed <= 600 + refilled + 1


def test_tpm_another_worker_nearly_empties_is_seen_by_the_next_call(pair) -> None:  # type: ignore[no-untyped-def]
    """A charge that leaves the TPM bucket near empty is announced, and heard before the
    other worker's next call (``catch_up``), which then asks Redis: without the
    announcement that worker's lease would trust its view of TPM for 0.25 s more."""
    a, b = pair
    b.start()  # its key-change listener
    assert a.admit(33, rpm=100_000, tpm=1000).allowed and b.admit(33, 100_000, 1000).allowed
    wait_until(
        lambda: a._holdings[33].leases and b._holdings[33].leases and b._changes._subscription
    )
    a.finish(33, "call-1", tpm=1000, tokens=850)  # 150 left: more than a tenth
    a.usage(33, 100_000, 1000)  # a round trip after it: Redis ran it
    assert b.admit(33, rpm=100_000, tpm=1000).allowed  # from b's lease
    a.finish(33, "call-2", tpm=1000, tokens=5000)
    refused = a.admit(33, rpm=100_000, tpm=1000)  # a's own charge: seen at once
    assert (refused.allowed, refused.limit_type) == (False, "tpm")
    # Counted, not timed: 20 looks take 0.1 s or more (50 fit in the 0.25 s the lease
    # would trust its view), and a loaded machine may stall the test itself for 0.1 s.
    for _ in range(20):
        b.catch_up()  # what a call does before it looks at its key
        if not b.admit(33, rpm=100_000, tpm=1000).allowed:
            break
        gevent.sleep(0.005)  # the announcement on its way to b's socket
    else:
        raise AssertionError("worker b never heard of a's charge")


def test_a_lease_left_unused_is_given_back_when_it_ends(pair) -> None:  # type: ignore[no-untyped-def]
    a, _ = pair
    assert a.admit(34, rpm=12_000, tpm=None).allowed  # leases of 120, refilled 200 a second
    gevent.sleep(0.05)
    assert a._holdings[34].leases
    assert a.usage(34, 12_000, 10**6)["rpm"]["current"] >= 100  # the call and a lease
    gevent.sleep(LEASE_TTL)
    assert a.usage(34, 12_000, 10**6)["rpm"]["current"] == 0  # given back, the call refilled


@pytest.mark.parametrize("lowered", [300, 60])  # leased, and asked per call
def test_a_lease_of_a_limit_since_lowered_is_not_given_back_to_the_new_bucket(
    pair,  # type: ignore[no-untyped-def]
    lowered: int,
) -> None:
    """Given back with the old limit's bucket, a lease's unused requests refilled the
    lowered limit's bucket to full: its whole size through again when the lease ended."""
    a, _ = pair
    assert a.admit(35, rpm=100_000, tpm=None).allowed
    wait_until(lambda: a._holdings[35].leases)  # 1,000 requests, 999 of them unused
    started, allowed = time.monotonic(), 0
    while time.monotonic() - started < 2 * LEASE_TTL:  # the old lease ends meanwhile
        allowed += a.admit(35, rpm=lowered, tpm=None).allowed
        gevent.sleep(0.001)
    refilled = (time.monotonic() - started) * lowered / 60
    assert allowed <= lowered + refilled + 1


def test_small_limits_and_keys_with_more_than_rpm_and_tpm_ask_redis_every_call(
    shared_redis: RedisServer,
) -> None:
    prefix = uuid.uuid4().hex[:8]
    a, off = _on(shared_redis.url, prefix), _on(shared_redis.url, prefix, LIMIT_LEASE_SHARE=0)
    model = [model_bucket("gpt-4o@openai", 10**6, 10**4)]
    asks = [
        (a, {"rpm": 199, "tpm": 10**6}),  # leases of 1 would save nothing
        (a, {"rpm": 10**6, "tpm": 10**6, "extra": model}),
        (a, {"rpm": 10**6, "tpm": 10**6, "slot": ("call", 5)}),
        (a, {"rpm": 10**6, "tpm": 10**6, "budget": 100.0}),
        (off, {"rpm": 10**6, "tpm": 10**6}),  # LIMIT_LEASE_SHARE=0
    ]
    try:
        for key_id, (limiter, limits) in enumerate(asks, start=40):
            trips = _round_trips(limiter)
            for _ in range(5):
                assert limiter.admit(key_id, **limits).allowed
                gevent.sleep(0.01)
            assert len(trips) == 5, limits
        assert not a._holdings and not off._holdings
    finally:
        a.stop()
        off.stop()


def test_with_redis_away_a_lease_s_calls_hold_and_none_asks_for_another(
    redis_server: RedisServer,
) -> None:
    """While Redis is away a live lease still limits its calls; past it, calls fail open
    as any do, and no call asks for a lease (a greenlet and a fail-open each)."""
    limiter = _on(redis_server.url, "lease-away", REDIS_RETRY_AFTER=5.0)
    try:
        assert limiter.admit(50, rpm=200, tpm=None).allowed  # leases of 2
        wait_until(lambda: limiter._holdings[50].leases, timeout=5)
        redis_server.stop()
        held = [limiter.admit(50, rpm=200, tpm=None) for _ in range(2)]
        assert all(a.allowed and not a.failed_open for a in held)  # from the lease
        asked = _fail_opens("lease")
        answers = []
        for _ in range(20):
            answers.append(limiter.admit(50, rpm=200, tpm=None))
            gevent.sleep(0.01)  # calls come over time: what one spawned has run
        assert all(a.allowed and a.failed_open for a in answers)
        assert _fail_opens("lease") - asked <= 1  # the one that found Redis away
    finally:
        limiter.stop()


def test_every_operation_that_can_fail_open_is_exported_from_the_start() -> None:
    """Each name the limiter counts a fail-open under is in OPERATIONS (exported at 0)."""
    source = "".join(Path(m.__file__).read_text() for m in (limiter_module, failopen, keychanges))
    counted = set(re.findall(r'(?:guarded|send_or_owe|_failed_open)\(\s*"(\w+)"', source))
    assert counted and counted <= set(limiter_module.OPERATIONS)
