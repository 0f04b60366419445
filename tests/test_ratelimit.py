"""The Redis store: the Lua scripts decide exactly as the in-process store does.

Each scenario runs step for step against ``RedisStore`` (the Lua scripts on this test
session's own redis-server, with the clock passed in instead of ``TIME``) and
``LocalStore``, and every answer must be equal, to the last bit of every float. Then the
parts only Redis has: its own clock, the hash tags on a Redis Cluster, Sentinel, a
password, and errors surfacing as ``StoreDown``.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import gevent
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.buckets import Bucket, LocalStore, per_minute
from gateway.ratelimit import RedisStore, StoreDown, connect
from gateway.redisconns import Connections
from tests.servers import RedisServer, free_port, wait_until

TIMEOUT = 0.5  # generous: the machine is shared; timeouts are tested in test_limiter


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


BUCKETS = [
    per_minute("rpm", 7),
    per_minute("tpm", 900, cost=0),
    Bucket("model:x@y", 4, 0.7),
    Bucket("second", 2, 1.0),  # whole seconds land exactly on a boundary
]
step = st.one_of(
    st.tuples(st.just("admit"), st.sets(st.integers(0, 3), min_size=1)),
    st.tuples(st.just("charge"), st.integers(0, 3), st.integers(-3, 2000)),
    st.tuples(st.just("peek"), st.sets(st.integers(0, 3), min_size=1)),
    st.tuples(st.just("acquire"), st.sampled_from("abcd"), st.integers(1, 3)),
    st.tuples(st.just("refresh"), st.sampled_from("abcd")),
    st.tuples(st.just("release"), st.sampled_from("abcd")),
    st.tuples(st.just("claim"), st.sampled_from("uvw")),
    # a claim under the key's mark (a store that may have started empty): its grace
    st.tuples(st.just("claim+mark"), st.sampled_from("uvw"), st.sampled_from([0.0, 5.0, 30.0])),
    st.tuples(st.just("keep"), st.sampled_from("uvw")),
    st.tuples(st.just("unclaim"), st.sampled_from("uvw")),
    st.tuples(st.just("settle"), st.sampled_from("uvw"), st.sampled_from(['{"a": 1}', "答"])),
    # admit with a slot (one step): any buckets, a member, the slots' limit
    st.tuples(
        st.just("admit+slot"),
        st.sets(st.integers(0, 3)),
        st.sampled_from("abcd"),
        st.integers(1, 3),
    ),
    # admit under a budget: any buckets, a slot or none, the limit the spend must be below
    st.tuples(
        st.just("admit+budget"),
        st.sets(st.integers(0, 3)),
        st.sampled_from(["a", "b", None]),
        st.one_of(st.integers(-5, 4000), st.sampled_from([2**60, 2**60 + 1, -(2**60)])),
    ),
    # a month's spend grows (or, here, shrinks: the scripts need not care)
    st.tuples(st.just("add"), st.one_of(st.integers(-3, 2000), st.sampled_from([2**60, -(2**61)]))),
    # ... or is raised to the records' figure
    st.tuples(st.just("raise_to"), st.one_of(st.integers(0, 4000), st.sampled_from([2**60 + 3]))),
    # the keeper's refreshes, then a finished call's operations, in one round trip
    st.tuples(
        st.just("run_all"),
        st.sampled_from("uvw"),
        st.sampled_from("abcd"),
        st.integers(0, 3),
        st.integers(-3, 2000),
    ),
)
scenario = st.lists(
    st.tuples(
        st.one_of(st.floats(min_value=0, max_value=20, allow_nan=False), st.integers(0, 3)), step
    ),
    max_size=40,
)


def _apply(store, prefix: str, op: tuple):  # type: ignore[no-untyped-def]
    kind = op[0]
    slots, claims = f"{prefix}:{{k}}:inflight", f"{prefix}:{{k}}:req:r1"
    if kind in ("admit", "peek", "admit+slot"):
        chosen = sorted(op[1])
        keys = [f"{prefix}:{{k}}:{BUCKETS[i].name}" for i in chosen]
        if kind == "admit+slot":
            return store.admit(keys, [BUCKETS[i] for i in chosen], (slots, op[2], op[3], 9.0))
        return getattr(store, kind)(keys, [BUCKETS[i] for i in chosen])
    if kind == "admit+budget":
        chosen = sorted(op[1])
        keys = [f"{prefix}:{{k}}:{BUCKETS[i].name}" for i in chosen]
        slot = None if op[2] is None else (slots, op[2], 2, 9.0)
        # The mark outlives the scenario: its expiry is on Redis's clock, not the test's.
        budget = (f"{prefix}:{{k}}:spend", op[3], f"{prefix}:{{k}}:spend:seeded", 1e6)
        return store.admit(keys, [BUCKETS[i] for i in chosen], slot, budget)
    if kind in ("add", "raise_to"):
        return getattr(store, kind)(f"{prefix}:{{k}}:spend", op[1], 1e6)
    if kind == "charge":
        bucket = BUCKETS[op[1]]
        return store.charge(f"{prefix}:{{k}}:{bucket.name}", bucket, op[2])
    if kind == "run_all":
        bucket = BUCKETS[op[3]]
        return store.run_all(
            [
                ("refresh", (slots, op[2], 9.0)),
                ("keep_claim", (claims, op[1], 12.0)),
                ("settle", (claims, op[1], '{"a": 2}', 30.0)),
                ("unclaim", (claims, op[1])),
                ("release", (slots, op[2])),
                ("charge", (f"{prefix}:{{k}}:{bucket.name}", bucket, op[4])),
                ("add", (f"{prefix}:{{k}}:spend", op[4], 1e6)),
            ]
        )
    if kind == "acquire":
        return store.acquire(slots, op[1], op[2], 9.0)
    if kind == "refresh":
        return store.refresh(slots, op[1], 9.0)
    if kind == "release":
        return store.release(slots, op[1])
    if kind == "claim":
        return store.claim(claims, op[1], 12.0)
    if kind == "claim+mark":
        return store.claim(claims, op[1], 12.0, 0.0, f"{prefix}:{{k}}:claims-since", op[2])
    if kind == "keep":
        return store.keep_claim(claims, op[1], 12.0)
    if kind == "settle":
        return store.settle(claims, op[1], op[2], 30.0)
    return store.unclaim(claims, op[1])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=scenario)
@example(steps=[(0, ("admit", {3})), (0, ("admit", {3})), (1, ("admit", {3}))])  # exactly 1 left
@example(steps=[(0, ("charge", 1, 900)), (0, ("peek", {1})), (0, ("admit", {1}))])  # TPM at 0
@example(  # past what a double holds, the budget still compares exactly
    steps=[(0, ("add", 2**60)), (0, ("add", 1)), (0, ("admit+budget", {0}, "a", 2**60 + 1)),
           (0, ("admit+budget", {0}, None, 2**60 + 2)), (0, ("add", -(2**61))),
           (0, ("admit+budget", set(), "b", -(2**60)))]
)  # fmt: skip
@example(  # claims under the key's mark: unsure within its grace, sure after it
    steps=[(0, ("claim+mark", "u", 30.0)), (0, ("claim+mark", "v", 30.0)), (13, ("claim+mark", "v", 30.0)),
           (20, ("claim+mark", "w", 30.0)), (0, ("claim+mark", "u", 5.0))]
)  # fmt: skip
@example(  # a claim that lapsed is nobody's to give back, forgotten by the store or not
    steps=[(0, ("claim", "u")), (8, ("refresh", "a")), (5, ("release", "a")), (18, ("admit", {0})),
           (14, ("refresh", "a")), (10, ("charge", 0, 0)), (17, ("admit", {0})), (0, ("admit", {0})),
           (0, ("run_all", "u", "a", 0, 0))]
)  # fmt: skip
@example(  # a settled claim answers repeats until its own expiry, then is claimed afresh
    steps=[(0, ("claim", "u")), (1, ("settle", "u", "答")), (20, ("claim", "v")),
           (0, ("keep", "u")), (0, ("unclaim", "u")), (11, ("claim", "w"))]
)  # fmt: skip
def test_lua_and_in_process_stores_answer_alike(shared_redis: RedisServer, steps: list) -> None:
    clock = Clock()
    redis_store = RedisStore(connect(shared_redis.url, TIMEOUT, TIMEOUT), clock)
    local = LocalStore(clock, marks=True)
    prefix = uuid.uuid4().hex
    for dt, op in steps:
        clock.now += dt
        assert _apply(redis_store, prefix, op) == _apply(local, prefix, op), op


def test_an_admission_writes_only_the_buckets_it_takes_from(shared_redis: RedisServer) -> None:
    """The TPM check (cost 0) reads its bucket and leaves it as it was: two writes fewer."""
    clock = Clock()
    store = RedisStore(connect(shared_redis.url, TIMEOUT, TIMEOUT), clock)
    rpm, tpm = BUCKETS[0], BUCKETS[1]
    keys = [f"{uuid.uuid4().hex}:{{k}}:{b.name}" for b in (rpm, tpm)]
    store.charge(keys[1], tpm, 600)  # a finished call's tokens: stored at this time
    expiry = store.client.pttl(keys[1])
    clock.now += 30
    verdict = store.admit(keys, [rpm, tpm])
    assert verdict.allowed and verdict.levels[1] == 300 + 30 * tpm.rate  # refilled as read
    assert store.client.hmget(keys[1], "t") == [b"1700000000"]  # still the charge's
    assert store.client.pttl(keys[1]) <= expiry
    assert store.client.hget(keys[0], "t") == b"1700000030"  # RPM paid: stored


def test_a_claim_within_the_grace_of_the_keys_mark_is_unsure(shared_redis: RedisServer) -> None:
    """A store that began to keep a key's claims lately (a Redis restarted empty) may
    have lost the claim of a call still in flight: a claim taken then says so (the
    claimer itself as the holder), one taken after the grace does not."""
    now = [1000.0]
    store = RedisStore(connect(shared_redis.url, TIMEOUT, TIMEOUT), lambda: now[0])
    tag = f"gw:{{key:{uuid.uuid4().hex[:8]}}}"
    mark = f"{tag}:claims-since"
    unsure = store.claim(f"{tag}:req:a", "first", 5.0, 0.0, mark, 30.0)
    assert unsure is not None and (unsure.uid, unsure.answer) == ("first", None)
    holder = store.claim(f"{tag}:req:a", "repeat", 5.0, 0.0, mark, 30.0)
    assert holder is not None and holder.uid == "first"  # held: as ever
    now[0] += 29.0
    assert store.claim(f"{tag}:req:b", "second", 5.0, 0.0, mark, 30.0).uid == "second"
    now[0] += 1.0
    assert store.claim(f"{tag}:req:c", "third", 5.0, 0.0, mark, 30.0) is None
    assert store.claim(f"{tag}:req:d", "plain", 5.0) is None  # no mark: as before


def test_without_a_clock_the_server_time_refills(shared_redis: RedisServer) -> None:
    store = RedisStore(connect(shared_redis.url, TIMEOUT, TIMEOUT))
    bucket, key = Bucket("b", 5, 20.0), f"{uuid.uuid4().hex}:{{k}}:b"  # 20 tokens a second
    assert sum(store.admit([key], [bucket]).allowed for _ in range(10)) == 5
    time.sleep(0.2)  # about 4 tokens back, on Redis's clock
    assert 2 <= sum(store.admit([key], [bucket]).allowed for _ in range(10)) <= 5
    assert 0 < shared_redis_pttl(shared_redis, key) <= 61_000  # kept until full + margin


def test_finishing_operations_survive_a_redis_that_lost_its_scripts(
    shared_redis: RedisServer,
) -> None:
    """A restarted Redis has no scripts: run_all loads them and runs what it refused."""
    store = RedisStore(connect(shared_redis.url, TIMEOUT, TIMEOUT))
    prefix, bucket = uuid.uuid4().hex, Bucket("tpm", 100, 1.0)
    assert store.acquire(f"{prefix}:{{k}}:inflight", "a", 2, 9.0) == (True, 1)
    shared_redis.command("SCRIPT", "FLUSH")
    operations = [
        ("release", (f"{prefix}:{{k}}:inflight", "a")),
        ("charge", (f"{prefix}:{{k}}:tpm", bucket, 30)),
        ("add", (f"{prefix}:{{k}}:spend", 5, 60.0)),
    ]
    assert store.run_all(operations) == [0, pytest.approx(70, abs=1), 5]  # refills meanwhile
    assert store.run_all(operations)[1:] == [pytest.approx(40, abs=1), 10]


def test_posted_operations_run_once_on_a_redis_that_lost_its_scripts(
    shared_redis: RedisServer,
) -> None:
    """Posted operations Redis refused for want of a script are run again, once, before
    the round trip that read their refusal is run again."""
    store = RedisStore(connect(shared_redis.url, TIMEOUT, TIMEOUT))
    prefix, bucket = uuid.uuid4().hex, Bucket("tpm", 100, 0.001)
    assert store.total(f"{prefix}:{{k}}:spend") == 0  # a connection kept
    shared_redis.command("SCRIPT", "FLUSH")
    store.post_all(
        [("charge", (f"{prefix}:{{k}}:tpm", bucket, 30)), ("add", (f"{prefix}:{{k}}:spend", 5, 60))]
    )
    assert store.total(f"{prefix}:{{k}}:spend") == 5
    assert store.peek([f"{prefix}:{{k}}:tpm"], [bucket]) == (pytest.approx(70, abs=0.01),)


def test_posted_operations_join_a_round_trip_in_flight(shared_redis: RedisServer) -> None:
    """While a round trip is in flight, posted operations go out with the next one, as
    any script asked for then (one write for Redis to read), and are waited for; with
    none in flight they are written at once and not waited for."""
    store = RedisStore(connect(shared_redis.url, TIMEOUT, TIMEOUT))
    key = f"{uuid.uuid4().hex}:{{k}}:s"
    assert store.total(key) == 0  # a connection kept, the scripts loaded
    store.post_all([("add", (key, 1, 60.0))])
    assert len(store._conns._owed) == 1  # written; its reply is read with the next one
    shared_redis.command("CLIENT", "PAUSE", "200")
    in_flight = gevent.spawn(store.total, key)
    gevent.sleep(0.05)  # sent; waiting for its reply
    assert store._direct.busy
    batches = store._direct.batches
    store.post_all([("add", (key, 2, 60.0))])
    assert store._direct.batches == batches + 1 and not store._conns._owed
    assert in_flight.get() == 1 and store.total(key) == 3


def test_posted_operations_with_no_round_trip_after_them_are_read_in_bounds(
    shared_redis: RedisServer,
) -> None:
    """A key with no limits makes no round trip, only posts (its spend): their replies
    are read once a connection holds OWED of them, not left to pile up in Redis."""
    store = RedisStore(connect(shared_redis.url, TIMEOUT, TIMEOUT))
    key = f"{uuid.uuid4().hex}:{{k}}:s"
    for _ in range(3 * Connections.OWED + 5):
        store.post_all([("add", (key, 1, 60.0))])
        assert all(len(owed) < Connections.OWED for owed in store._conns._owed.values())
    assert store.total(key) == 3 * Connections.OWED + 5


def test_posted_operations_that_fail_or_go_unanswered_are_reported(
    redis_server: RedisServer,
) -> None:
    """A posted operation's error reply, or a connection that fails before its reply is
    read, reaches ``on_lost`` (the limiter counts it as failed open, and sends again
    what is harmless to run twice: the give-backs it names); replies already read are
    not lost when the connection fails after them."""
    store = RedisStore(connect(redis_server.url, 0.1, TIMEOUT))
    lost: list[tuple[int, str]] = []
    again: list[tuple[str, tuple]] = []

    def on_lost(count: int, harmless: list[tuple[str, tuple]], exc: Exception) -> None:
        lost.append((count, type(exc).__name__))
        again.extend(harmless)

    store.on_lost = on_lost
    assert store.add("o:{k}:s", 1, 60.0) == 1
    redis_server.command("RPUSH", "o:{k}:list", "x")
    store.post_all([("add", ("o:{k}:list", 1, 60.0)), ("add", ("o:{k}:s", 2, 60.0))])
    assert store.total("o:{k}:s") == 3
    assert lost == [(1, "ResponseError")]  # WRONGTYPE; the other ran

    store.post_all([("add", ("o:{k}:s", 4, 60.0))])
    gevent.sleep(0.2)  # answered; then Redis closes the connection, as an idle timeout would
    redis_server.command("CLIENT", "KILL", "TYPE", "normal")
    assert store.total("o:{k}:s") == 7  # its reply was read, its own sent again
    assert lost == [(1, "ResponseError")]

    assert again == []
    redis_server.command("CLIENT", "PAUSE", "500")
    give_backs = [
        ("release", ("o:{k}:slots", "call-1")),
        ("settle", ("o:{k}:req:a", "call-2", "answer", 60.0)),
        ("unclaim", ("o:{k}:req:b", "call-3")),
    ]
    store.post_all([("add", ("o:{k}:s", 8, 60.0)), *give_backs, ("add", ("o:{k}:s", 8, 60.0))])
    with pytest.raises(StoreDown, match="Timeout"):
        store.total("o:{k}:s")  # times out reading the posted replies
    assert lost == [(1, "ResponseError"), (5, "TimeoutError")]
    assert again == give_backs  # the additions may have run: not sent again


def shared_redis_pttl(server: RedisServer, key: str) -> int:
    return int(server.command("PTTL", key))


def test_errors_surface_as_store_down(redis_server: RedisServer) -> None:
    store = RedisStore(connect(redis_server.url, TIMEOUT, TIMEOUT))
    store.charge("x:{k}:b", Bucket("b", 5, 1), 1)
    redis_server.stop()
    with pytest.raises(StoreDown):
        store.charge("x:{k}:b", Bucket("b", 5, 1), 1)


def test_replies_are_parsed_by_hiredis(redis_server: RedisServer) -> None:
    """requirements.txt installs hiredis, redis-py's parser in C: with limits in Redis a
    call costs the worker about 6% less CPU with it (``bench/pair.py --redis``). Without
    it redis-py falls back to its Python parser, silently: this says so."""
    client = connect(redis_server.url, TIMEOUT, TIMEOUT)
    connection = client.connection_pool.get_connection()
    try:
        assert type(connection._parser).__name__ == "_HiredisParser"
    finally:
        client.connection_pool.release(connection)


def test_a_restarted_redis_costs_no_operation(redis_server: RedisServer) -> None:
    """Connections kept from before a restart, or closed by Redis while idle, are
    replaced as they are used, and the scripts the restart lost are loaded again: no
    operation fails (a failure would fail the limits open for REDIS_RETRY_AFTER)."""
    store = RedisStore(connect(redis_server.url, TIMEOUT, TIMEOUT))
    bucket = Bucket("b", 5, 0.001)
    assert store.acquire("r:{k}:inflight", "a", 3, 60.0) == (True, 1)
    assert store.run_all([("charge", ("r:{k}:b", bucket, 1)), ("add", ("r:{k}:s", 2, 60.0))])
    redis_server.stop()
    redis_server.start()  # empty: no keys, no scripts
    assert store.acquire("r:{k}:inflight", "a", 3, 60.0) == (True, 1)
    assert store.run_all([("add", ("r:{k}:s", 2, 60.0)), ("add", ("r:{k}:s", 1, 60.0))]) == [2, 3]
    redis_server.command("CLIENT", "KILL", "TYPE", "normal")  # as an idle timeout would
    assert store.admit(["r:{k}:b"], [bucket]).levels == (pytest.approx(4, abs=0.01),)
    assert store.total("r:{k}:s") == 3


def test_a_late_reply_is_never_taken_for_the_next_ones(redis_server: RedisServer) -> None:
    """A command that timed out is answered later, on its own connection; that
    connection is never used again, so no later command reads that answer as its own."""
    store = RedisStore(connect(redis_server.url, 0.1, TIMEOUT))
    assert store.add("l:{k}:first", 1, 60.0) == 1  # a connection kept
    redis_server.command("CLIENT", "PAUSE", "500")
    with pytest.raises(StoreDown, match="Timeout"):
        store.add("l:{k}:first", 5, 60.0)

    def total() -> int | None:
        try:
            return store.total("l:{k}:first")
        except StoreDown:  # still paused
            return None

    wait_until(lambda: total() is not None, timeout=5)
    # Redis 7 drops a paused command whose client has gone; had it run, it added 5.
    assert total() in (1, 6)
    assert [store.add("l:{k}:second", 1, 60.0) for _ in range(3)] == [1, 2, 3]


def test_a_forked_process_makes_connections_of_its_own(redis_server: RedisServer) -> None:
    """A child never sends on its parent's kept socket (their replies would cross)."""
    store = RedisStore(connect(redis_server.url, TIMEOUT, TIMEOUT))
    assert store.add("f:{k}:parent", 1, 60.0) == 1  # a connection kept

    def clients() -> int:  # redis-cli's own included
        return len(redis_server.command("CLIENT", "LIST").decode().strip().splitlines())

    before = clients()
    ready, done = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one operation, then it waits until the parent has looked
        try:
            os.write(ready[1], b"%d" % store.add("f:{k}:child", 5, 60.0))
            os.read(done[0], 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready[0], 16) == b"5"
        assert clients() == before + 1  # the child's own
    finally:
        os.write(done[1], b"x")
        os.waitpid(pid, 0)
    assert store.add("f:{k}:parent", 1, 60.0) == 2


def test_greenlets_that_ask_at_once_share_round_trips_and_get_their_own_answers(
    shared_redis: RedisServer,
) -> None:
    store = RedisStore(connect(shared_redis.url, TIMEOUT, TIMEOUT))
    prefix, bucket = uuid.uuid4().hex, Bucket("b", 1000, 1.0)

    def call(i: int) -> tuple:
        key = f"{prefix}:{{k{i}}}"
        added = store.run_all([("add", (f"{key}:s", i, 60.0))] * (i % 3 + 1))
        return added, store.admit([f"{key}:b"], [bucket]).levels, store.total(f"{key}:s")

    calls = [gevent.spawn(call, i) for i in range(60)]
    gevent.joinall(calls, raise_error=True)
    for i, greenlet in enumerate(calls):
        n = i % 3 + 1
        assert greenlet.value == (
            [i * k for k in range(1, n + 1)],
            (pytest.approx(999, abs=0.01),),
            i * n,
        )
    assert store._direct.batches > 0  # some answers did share a round trip


def test_a_slow_redis_fails_every_caller_of_a_shared_round_trip(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(connect(redis_server.url, 0.1, TIMEOUT))
    assert store.add("p:{k}:s", 1, 60.0) == 1
    redis_server.command("CLIENT", "PAUSE", "3000")

    def add(i: int) -> int | str:
        try:
            return store.add(f"p:{{k}}:{i}", 1, 60.0)
        except StoreDown:
            return "down"

    started = time.monotonic()
    calls = [gevent.spawn(add, i) for i in range(20)]
    gevent.joinall(calls, raise_error=True, timeout=5)
    # None hangs, none answers wrong: had each waited out a timeout of its own, one after
    # the other (0.5 s each), the sixth would have outlived the pause and been answered.
    assert [g.value for g in calls] == ["down"] * 20
    # The first's timeout, then the batch's (1 s), with room for a loaded machine.
    assert time.monotonic() - started < 2.0
    wait_until(lambda: add(99) == 1, timeout=5)  # answers again once the pause is over
    assert [store.add("p:{k}:s", 1, 60.0) for _ in range(2)] == [2, 3]


def test_a_password_in_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", "--requirepass", "s3cret")
    try:
        store = RedisStore(connect(f"redis://:s3cret@127.0.0.1:{server.port}/0", TIMEOUT, TIMEOUT))
        assert store.admit(["p:{k}:b"], [Bucket("b", 1, 1)]).allowed
        wrong = RedisStore(connect(f"redis://:nope@127.0.0.1:{server.port}/0", TIMEOUT, TIMEOUT))
        with pytest.raises(StoreDown):
            wrong.admit(["p:{k}:b"], [Bucket("b", 1, 1)])
    finally:
        server.stop()


def test_a_unix_socket_url(tmp_path: Path) -> None:
    """Redis on the gateway's host, reached without TCP (README, Performance)."""
    socket = tmp_path / "redis.sock"
    server = RedisServer(tmp_path / "redis", "--unixsocket", str(socket), "--unixsocketperm", "700")
    try:
        store = RedisStore(connect(f"unix://{socket}?db=2", TIMEOUT, TIMEOUT))
        assert store.admit(["p:{k}:b"], [Bucket("b", 1, 1)]).allowed
        assert not store.admit(["p:{k}:b"], [Bucket("b", 1, 1)]).allowed  # the same bucket
        assert server.command("-n", "2", "EXISTS", "p:{k}:b").strip() == b"1"  # that server's
        assert store.add("p:{k}:n", 5, 60.0) == 5 and store.total("p:{k}:n") == 5
    finally:
        server.stop()


def test_scripts_run_on_a_cluster_because_keys_share_a_hash_tag(tmp_path: Path) -> None:
    """A one-node Redis Cluster refuses a script whose keys span slots (CROSSSLOT)."""
    server = RedisServer(
        tmp_path / "cluster",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(tmp_path / "cluster" / "nodes.conf"),
        "--cluster-port",  # the bus port, else port + 10000: maybe taken, or over 65535
        str(free_port()),
    )
    try:
        server.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        wait_until(lambda: b"cluster_state:ok" in server.command("CLUSTER", "INFO"), timeout=10)
        store = RedisStore(connect(f"redis+cluster://127.0.0.1:{server.port}", TIMEOUT, TIMEOUT))
        tagged = [f"gw:{{key:7}}:{b.name}" for b in BUCKETS]
        assert store.admit(tagged, BUCKETS).allowed
        assert store.acquire("gw:{key:7}:inflight", "call", 1, 5) == (True, 1)
        assert store.claim("gw:{key:7}:req:r", "call", 5) is None
        slot = ("gw:{key:7}:inflight", "next", 2, 5)
        assert store.admit(tagged, BUCKETS, slot).allowed  # the second of 2 slots
        assert store.run_all([("release", ("gw:{key:7}:inflight", "next"))]) == [1]
        with pytest.raises(StoreDown, match="same key slot"):  # without one tag: refused
            store.admit([f"gw:key:7:{b.name}" for b in BUCKETS], BUCKETS)
        heard = store.subscribe("gw:keys")
        store.publish("gw:keys", "a-key-hash")  # its PING goes to the cluster's nodes
        assert wait_until(lambda: heard.next(0.1), timeout=5) == "a-key-hash"
        store.publish("gw:keys", "another")  # at the socket, not yet read: a look sees it
        assert wait_until(heard.arrived, timeout=5) and heard.next(0.1) == "another"
        assert not heard.arrived()
    finally:
        server.stop()


def test_sentinel_finds_the_master(tmp_path: Path) -> None:
    master = RedisServer(tmp_path / "master")
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor gwmaster 127.0.0.1 {master.port} 1\n"
    )
    sentinel = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"redis+sentinel://127.0.0.1:{port},127.0.0.1:{free_port()}/gwmaster/0"
        store = RedisStore(connect(url, TIMEOUT, TIMEOUT))

        def answers() -> bool:
            try:
                return store.admit(["s:{k}:b"], [Bucket("b", 3, 1)]).allowed
            except StoreDown:
                return False

        wait_until(answers, timeout=10, interval=0.1)
        assert master.command("EXISTS", "s:{k}:b").strip() == b"1"  # it is the master's
    finally:
        sentinel.kill()
        sentinel.wait()
        master.stop()


def test_a_sentinel_url_needs_a_service_name() -> None:
    with pytest.raises(ValueError, match="service name"):
        connect("redis+sentinel://127.0.0.1:26379", TIMEOUT, TIMEOUT)
