"""Several instances: two gunicorn gateways (2 gevent workers each) sharing one database
and one Redis, behind no balancer but the test itself.

What must hold across all of them at once: a key's RPM limit (within one token), TPM
charged by a stream whose client hung up (seen from the other instance), one upstream
call for one request id sent to both at once, maxConcurrent counting a drain, a revoked
key refused everywhere at once, sign-in throttling per address; and with Redis stopped
mid-test, calls go on (recorded, fail-opens counted) and limits come back with it.

The pair shares the test session's redis-server under a prefix of its own; the
Redis-away test stops a redis-server of its own. Redis commands get 1 s here
(production: 50 ms) so that a loaded test machine does not fail the limits open.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

import gevent
import gevent.pool
import openai
import pytest
import requests

from tests.servers import ADMIN_SECRET, Gateway, RedisServer, stop_all, wait_until

pytestmark = pytest.mark.server

CHAT = "/v1/chat/completions"
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
ENV = {
    "GATEWAY_REDIS_TIMEOUT": "1.0",
    "GATEWAY_CACHE_TTL": "60",  # only an announcement can make a worker forget a key
    "GATEWAY_TRUSTED_PROXIES": "127.0.0.1",  # throttling counts the X-Forwarded-For address
}


@pytest.fixture(scope="module")
def pair(module_database: tuple, fake, shared_redis: RedisServer) -> Any:  # type: ignore[no-untyped-def]
    """Gateways a and b on one database and one Redis, and model ``fake`` on the fake."""
    url, directory = module_database
    prefix = f"pair{uuid.uuid4().hex[:8]}"  # this pair's keys and channel on the shared Redis
    env = {**ENV, "REDIS_URL": shared_redis.url, "GATEWAY_REDIS_PREFIX": prefix}
    started = []
    try:
        for name in ("a", "b"):
            started.append(Gateway(url, directory / name, workers=2, **env))
        a, b = started
        route = a.setup_route(fake.url, remote_id="fake")  # before a worker loads the catalog
        model = {"providerId": route["provider"]["id"], "systemName": "limited"}
        a.api("POST", "/models", json={**model, "remoteId": "fake"})
        yield a, b
    finally:
        stop_all(started)


def new_key(gw: Gateway, **fields: Any) -> tuple[str, int]:
    made = gw.api("POST", "/apiKey", json={"comment": "instances", **fields})
    return made["key"], made["id"]


def call(gw: Gateway, key: str, script: str = "", **headers: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}", "X-Fake-Script": script, **headers}
    return requests.post(gw.url + CHAT, json=BODY, headers=headers, timeout=30)


def test_a_global_rpm_limit_holds_within_one_token_across_instances_and_workers(pair, fake) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    key, key_id = new_key(a, rpmLimit=20, tpmLimit=10**6)
    call_id = uuid.uuid4().hex
    pool = gevent.pool.Pool(40)
    answers = pool.map(lambda i: call((a, b)[i % 2], key, f"id={call_id}").status_code, range(40))
    allowed = answers.count(200)
    assert 20 <= allowed <= 21 and answers.count(429) == 40 - allowed, Counter(answers)
    assert len(fake.log(call_id)) == allowed, "a refused call never reaches the upstream"
    rows = a.wait_final(allowed, apiKeyId=key_id)
    assert len(rows) == allowed, "a refused call is never recorded"
    refused = sum(
        _metric(gw, "nexusgate_rate_limit_rejections_total", f'api_key_id="{key_id}"')
        for gw in (a, b)
    )
    assert refused == 40 - allowed  # counted on the instance that refused it


def test_tpm_charged_by_an_aborted_stream_is_seen_from_the_other_instance(pair, fake) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    key, key_id = new_key(a, tpmLimit=30)  # refills half a token a second
    call_id = uuid.uuid4().hex
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model="fake",
        messages=BODY["messages"],
        stream=True,
        extra_headers={"X-Fake-Script": f"id={call_id};chunks=30;delay=0.03"},
    )
    for i, _chunk in enumerate(stream):
        if i == 2:
            break
    stream.close()  # the client hangs up; the gateway reads the upstream to its end
    (row,) = a.wait_final(1, apiKeyId=key_id)
    (sent,) = fake.log(call_id)
    assert row["status"] == "aborted" and sent["outcome"] == "complete"
    tokens = row["promptTokens"] + row["completionTokens"]
    assert tokens == sent["usage"]["input_tokens"] + 30 > 30
    usage = b.api("GET", f"/apiKey/{key_id}/usage")["usage"]["tpm"]
    assert usage["remaining"] == 0 and usage["current"] >= tokens - 5  # less what refilled
    refused = call(b, key)
    assert refused.status_code == 429 and refused.json()["error"]["message"].endswith(
        "token quota exhausted"
    )


def test_one_request_id_sent_to_both_at_once_reaches_the_upstream_once(pair, fake) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    key, key_id = new_key(a)
    call_id, req_id = uuid.uuid4().hex, f"job-{uuid.uuid4().hex[:8]}"
    script = f"id={call_id};first_delay=0.6"
    both = [gevent.spawn(call, gw, key, script, **{"X-NexusGate-ReqId": req_id}) for gw in (a, b)]
    answers = sorted((g.get() for g in both), key=lambda r: r.status_code)
    assert [r.status_code for r in answers] == [200, 409]
    busy = answers[1]
    assert busy.json()["error"]["type"] == "conflict" and int(busy.headers["Retry-After"]) >= 1
    # NexusGate's fields; started_at is when the other instance claimed the id (Redis's clock).
    error = busy.json()["error"]
    assert (error["req_id"], error["retry_after"]) == (req_id, int(busy.headers["Retry-After"]))
    started = datetime.fromisoformat(error["started_at"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - started) < timedelta(seconds=10)
    assert len(fake.log(call_id)) == 1
    a.wait_final(1, apiKeyId=key_id)
    for gw in (b, a):  # later repeats, on either instance: the stored answer
        again = call(gw, key, script, **{"X-NexusGate-ReqId": req_id})
        assert again.status_code == 200
        assert again.json()["choices"][0]["message"] == answers[0].json()["choices"][0]["message"]
    assert len(fake.log(call_id)) == 1
    rows = a.wait_final(3, apiKeyId=key_id)
    source = next(r for r in rows if r["status"] == "completed")
    assert source["reqId"] == req_id
    assert sorted(r["status"] for r in rows) == ["cache_hit", "cache_hit", "completed"]
    assert {r["sourceCompletionId"] for r in rows if r["status"] == "cache_hit"} == {source["id"]}


def test_max_concurrent_holds_across_instances_and_a_drain_counts(pair, fake) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    key, key_id = new_key(a, maxConcurrent=1)
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model="fake",
        messages=BODY["messages"],
        stream=True,
        extra_headers={"X-Fake-Script": "chunks=40;delay=0.1"},
    )
    next(iter(stream))
    stream.close()  # gone; the drain goes on for about 4 s
    wait_until(lambda: _metric(a, "gateway_drains_in_flight", "") == 1, timeout=3)
    busy = call(b, key)
    assert busy.status_code == 429 and "1 at once" in busy.json()["error"]["message"]
    (row,) = a.wait_final(1, apiKeyId=key_id, timeout=30)
    assert row["status"] == "aborted"
    assert call(b, key).status_code == 200  # the drain is over: its slot came back


def test_what_a_call_owes_is_in_redis_before_its_answer_leaves(pair, fake) -> None:  # type: ignore[no-untyped-def]
    """A finished call's slot, request id and tokens are sent to Redis before its answer
    goes (not waited for): the client's next call, on the other instance at once, finds
    the slot free, the stored answer, and then the tokens charged."""
    a, b = pair
    key, _ = new_key(a, maxConcurrent=1)
    answers = [call((a, b)[i % 2], key).status_code for i in range(40)]
    assert answers == [200] * 40  # never "1 at once": each slot came back in time
    req_id = {"X-NexusGate-ReqId": uuid.uuid4().hex}
    first = call(a, key, **req_id)
    repeat = call(b, key, **req_id)
    assert (first.status_code, repeat.status_code) == (200, 200)
    assert repeat.json()["id"] == first.json()["id"]  # the stored answer, not a 409
    key, _ = new_key(a, tpmLimit=5)
    assert call(a, key).status_code == 200  # more than 5 tokens: a debt
    refused = call(b, key)
    assert refused.status_code == 429 and "token quota" in refused.json()["error"]["message"]
    # A limit large enough for leases: b's workers admit from theirs, trusting their view
    # of TPM, until a's charge announces the bucket near empty (Redis tells them in about
    # a millisecond; the view alone would hold for 0.2 s more, until the next lease).
    key, _ = new_key(a, rpmLimit=10_000, tpmLimit=1000)
    assert {call(b, key).status_code for _ in range(8)} == {200}
    assert call(a, key, "input_tokens=5000").status_code == 200  # a debt
    # Counted, not timed: a call takes a few milliseconds (dozens fit in those 0.2 s),
    # and on a loaded machine one alone may take 0.1 s.
    admitted = 0
    while (refused := call(b, key)).status_code == 200:
        admitted += 1
        assert admitted <= 3, "b's workers never heard of a's charge"
    assert refused.status_code == 429 and "token quota" in refused.json()["error"]["message"]


def test_a_per_model_limit_made_on_one_instance_applies_on_the_other(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    key, _ = new_key(a)
    limited = {**BODY, "model": "limited"}

    def on_b() -> int:
        headers = {"Authorization": f"Bearer {key}"}
        return requests.post(b.url + CHAT, json=limited, headers=headers, timeout=30).status_code

    assert [on_b() for _ in range(3)] == [200] * 3  # nothing limits it yet
    a.api("POST", "/ratelimits", json={"identifier": "limited", "limit": 1, "refill": 0.1})
    try:
        wait_until(lambda: on_b() == 429, timeout=2, interval=0.05)
        assert [on_b() for _ in range(4)] == [429] * 4
    finally:
        a.admin.delete(f"{a.url}/api/admin/ratelimits/limited", timeout=10)


def test_a_revoked_key_is_refused_by_every_worker_of_every_instance_at_once(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    key, key_id = new_key(a)
    for _ in range(8):  # cached by both of b's workers (CACHE_TTL is a minute here)
        assert call(b, key, **{"X-NexusGate-Provider": "nowhere"}).status_code == 404
    a.api("DELETE", f"/apiKey/{key_id}")
    started = time.monotonic()
    assert [call(b, key).status_code for _ in range(8)] == [401] * 8
    assert time.monotonic() - started < 5


def test_a_key_revoked_while_redis_has_thousands_of_subscribers_to_tell_is_refused_at_once(
    pair,
) -> None:  # type: ignore[no-untyped-def]
    """Redis writes a PUBLISH's answer and its message to the subscribers in one turn,
    client by client, the answer possibly first. With 4,000 others listening (pattern
    subscribers), b's workers heard of a revocation after a's DELETE had answered: 7
    calls in 10 made right after it were let through (before ``publish`` waited)."""
    a, b = pair
    redis = urlparse(b.environ["REDIS_URL"])
    pattern = b.environ["GATEWAY_REDIS_PREFIX"] + ":key*"
    psubscribe = f"*2\r\n$10\r\nPSUBSCRIBE\r\n${len(pattern)}\r\n{pattern}\r\n".encode()
    listeners = []
    try:
        for _ in range(4000):
            listeners.append(socket.create_connection((redis.hostname, redis.port)))
            listeners[-1].sendall(psubscribe)
        for each in listeners:
            assert each.recv(100).startswith(b"*3\r\n$10\r\npsubscribe")
        for _ in range(6):
            key, key_id = new_key(a)
            for _ in range(4):  # cached by b's workers
                assert call(b, key, **{"X-NexusGate-Provider": "nowhere"}).status_code == 404
            a.api("DELETE", f"/apiKey/{key_id}")
            assert call(b, key).status_code == 401
    finally:
        for each in listeners:
            each.close()


def test_wrong_secrets_are_throttled_across_instances(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    address = {"X-Forwarded-For": f"203.0.113.{uuid.uuid4().int % 250 + 1}"}

    def admin(gw: Gateway, secret: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {secret}", **address}
        return requests.get(f"{gw.url}/api/admin/", headers=headers, timeout=10)

    assert [admin((a, b)[i % 2], "guess").status_code for i in range(10)] == [401] * 10
    throttled = admin(b, "guess")
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1
    assert admin(a, ADMIN_SECRET).status_code == 429
    login = requests.post(f"{a.url}/login", data={"secret": "guess"}, headers=address, timeout=10)
    assert login.status_code in (400, 429)  # no CSRF token: refused before any secret is read


def test_redis_away_leaves_calls_working_and_counted_and_limits_come_back(
    gateway_factory, fake, redis_server: RedisServer
) -> None:  # type: ignore[no-untyped-def]
    redis = redis_server  # this test's own: it stops it
    env = {**ENV, "REDIS_URL": redis.url, "GATEWAY_REDIS_RETRY_AFTER": "0.5"}
    a, b = gateway_factory(**env), gateway_factory(**env)
    a.setup_route(fake.url, remote_id="fake")
    key, key_id = new_key(a, rpmLimit=3)
    assert [call(a, key).status_code for _ in range(4)] == [200, 200, 200, 429]

    redis.stop()
    answers = [call((a, b)[i % 2], key).status_code for i in range(6)]
    assert answers == [200] * 6, "Redis away: every call goes on"
    rows = a.wait_final(9, apiKeyId=key_id)
    assert len(rows) == 9, "and every one is recorded"
    opened = sum(
        _metric(gw, "gateway_limiter_fail_open_total", 'operation="admit"') for gw in (a, b)
    )
    assert opened >= 6
    assert "limiter: Redis unavailable" in a.log()

    redis.start()  # empty: every bucket full again
    wait_until(lambda: call(a, key).status_code == 429, timeout=15, interval=0.2)
    assert call(b, key).status_code == 429, "the limit holds again on every instance"


def test_redis_killed_under_load_costs_no_call_and_no_record(
    gateway_factory, fake, redis_server: RedisServer
) -> None:  # type: ignore[no-untyped-def]
    """Redis killed (-9) while 16 clients call two instances, then started again: calls
    admitted before, settled while Redis was dying (their settling written and never
    answered) or in between all get their answer and their record, and whatever Redis
    did not answer is counted as a fail-open."""
    redis = redis_server
    env = {**ENV, "REDIS_URL": redis.url, "GATEWAY_REDIS_RETRY_AFTER": "0.3"}
    env["GATEWAY_SEARCH_COUNT_CAP"] = "100000"  # PostgreSQL counts exactly up to here
    a, b = gateway_factory(workers=2, **env), gateway_factory(workers=2, **env)
    a.setup_route(fake.url, remote_id="fake")
    key, key_id = new_key(a, maxConcurrent=50, tpmLimit=10**9, rpmLimit=10**6)
    statuses: list[int] = []
    stop = time.monotonic() + 3.0

    def client(i: int) -> None:
        session = requests.Session()
        gw = (a, b)[i % 2]
        headers = {"Authorization": f"Bearer {key}", "X-Fake-Script": "delay=0.01"}
        while time.monotonic() < stop:
            answer = session.post(gw.url + CHAT, json=BODY, headers=headers, timeout=30)
            statuses.append(answer.status_code)

    clients = [gevent.spawn(client, i) for i in range(16)]
    gevent.sleep(1.0)
    os.kill(redis.proc.pid, signal.SIGKILL)
    redis.proc.wait()
    gevent.sleep(1.0)
    redis.start()
    gevent.joinall(clients, raise_error=True)
    assert statuses and set(statuses) == {200}, Counter(statuses)

    def recorded(status: str) -> int:
        params = {"apiKeyId": key_id, "status": status, "limit": 1}
        return a.api("GET", "/completions", params=params)["total"]

    wait_until(lambda: recorded("completed") == len(statuses), timeout=60, interval=0.2)
    assert recorded("pending") == recorded("failed") == 0
    failed_open = sum(_metric(gw, "gateway_limiter_fail_open_total", "") for gw in (a, b))
    assert failed_open >= 1
    wait_until(lambda: call(a, key).status_code == 200, timeout=10)


def _metric(gw: Gateway, name: str, labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``, from gw's /metrics."""
    total = 0.0
    for line in requests.get(f"{gw.url}/metrics", timeout=10).text.splitlines():
        if line.startswith((name + "{", name + " ")) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_killed_workers_slots_lapse_within_inflight_ttl(
    gateway_factory, fake, redis_server: RedisServer
) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(**ENV, REDIS_URL=redis_server.url, GATEWAY_INFLIGHT_TTL="2")
    gw.setup_route(fake.url, remote_id="fake")
    key, _ = new_key(gw, maxConcurrent=1)
    slow = gevent.spawn(call, gw, key, "first_delay=30")
    wait_until(lambda: call(gw, key).status_code == 429, timeout=5)  # the slot is held
    (worker,) = gw.worker_pids()
    os.kill(worker, signal.SIGKILL)  # mid-call: nothing gives the slot back
    slow.join(timeout=10)
    killed = time.monotonic()
    wait_until(lambda: call(gw, key).status_code == 200, timeout=10, interval=0.2)
    assert time.monotonic() - killed < 5  # INFLIGHT_TTL (2 s), then the next try


def test_a_repeat_right_after_redis_restarted_empty_does_not_call_the_upstream_again(
    gateway_factory, fake, redis_server: RedisServer
) -> None:  # type: ignore[no-untyped-def]
    """Redis restarted empty loses the claim of a request id whose call still runs on
    another instance (its worker takes it again only at its next keep, up to a third of
    INFLIGHT_TTL later): a repeat meanwhile must still get 409, not a second upstream
    call, and the stored answer once the first is over."""
    redis = redis_server
    env = {**ENV, "REDIS_URL": redis.url}
    a, b = gateway_factory(**env), gateway_factory(**env)
    a.setup_route(fake.url, remote_id="fake")
    key, key_id = new_key(a)
    call_id, req_id = uuid.uuid4().hex, f"job-{uuid.uuid4().hex[:8]}"
    script, same = f"id={call_id};first_delay=3", {"X-NexusGate-ReqId": req_id}
    first = gevent.spawn(call, a, key, script, **same)
    wait_until(lambda: a.records(apiKeyId=key_id), timeout=5)  # in flight, its row pending
    assert call(b, key, script, **same).status_code == 409

    redis.stop()
    redis.start()  # empty: the claim is gone, the first call still runs
    again = call(b, key, script, **same)
    assert again.status_code == 409, again.text
    assert int(again.headers["Retry-After"]) >= 1
    assert first.get().status_code == 200
    a.wait_final(1, apiKeyId=key_id)
    assert call(b, key, script, **same).status_code == 200  # the stored answer
    assert len(fake.log(call_id)) == 1
    rows = a.wait_final(2, apiKeyId=key_id)
    assert sorted(r["status"] for r in rows) == ["cache_hit", "completed"]


def test_fail_opens_are_exported_at_zero_before_redis_ever_fails(pair) -> None:  # type: ignore[no-untyped-def]
    """The counter of calls let through while Redis is away is there from the start: a
    series that first appears at its value after an outage has no sample before it, so
    Prometheus's increase() and rate() count none of that outage (an instance's first
    one was invisible to an alert on them)."""
    for gw in pair:
        text = requests.get(f"{gw.url}/metrics", timeout=10).text
        for operation in ("admit", "claim", "finish"):
            series = f'gateway_limiter_fail_open_total{{operation="{operation}"}} '
            assert series in text, f"{gw.url}: no {series.strip()}"
