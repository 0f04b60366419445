"""State shared by every worker and instance for traffic control: the only redis importer.

``Limiter`` (one per worker process, ``limiter``) answers the call path's questions: may
this key make a call now (RPM, TPM, per-model buckets), may it start one more call
(``maxConcurrent`` slots), may it run this request id (dedup claims), has it spent its
monthly budget (running totals), may this address try a secret again (login/admin
throttling); and it announces key changes so that every worker forgets a revoked key at
once.

With ``REDIS_URL`` each operation is one Lua script (``gateway/lua/``) run by
``RedisStore`` on the Redis server's clock, every key of a script under one hash tag
(``gw:{key:42}:rpm``) so the scripts run unchanged on Redis Cluster. Scripts go out on
connections the store keeps (``redisconns``), and in a gevent worker those asked for
while a round trip is in flight share the next one (``pipelining``); what a finished
call owes is sent without waiting for its replies (``post_all``). Key changes are
heard on a channel (``subscription``). Without ``REDIS_URL``, the same operations
(``buckets.LocalStore``, same arithmetic) run in the instance's store process
(``instancestore``) or in this process. Redis down, slower than ``REDIS_TIMEOUT`` or
restarting: every operation fails open (allows), is counted (``metrics``), and logs a
warning at most once a minute; Redis is tried again ``REDIS_RETRY_AFTER`` seconds
later, so limits hold again as soon as it answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from gevent import monkey
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from gateway import pipelining, redisconns, subscription
from gateway.buckets import Bucket, Budget, Claim, Slot, Verdict
from gateway.subscription import Subscription

log = logging.getLogger(__name__)

SCRIPTS = Path(__file__).resolve().parent / "lua"
# What a command may raise when Redis is away, slow, restarting or misconfigured.
_FAILURES = (
    redis.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
    pipelining.Stopped,
)
# The exceptions of redis-py's that the kept connections tell apart.
_ERRORS = redisconns.Errors(
    closed=redis.ConnectionError,
    refused=redis.ResponseError,
    no_script=redis.exceptions.NoScriptError,
)


class StoreDown(Exception):
    """Redis did not answer in time, or answered with an error."""


# What a subscriber catches, what it raises for it, and what for a PING left unanswered.
_SUBSCRIBER_ERRORS = subscription.Errors(_FAILURES, StoreDown, redis.TimeoutError)


def connect(url: str, timeout: float, connect_timeout: float) -> Any:
    """A client for ``url``: redis://, rediss://, unix://, redis+sentinel://, redis+cluster://.

    ``redis[s]+sentinel://[user:password@]host:26379[,host:26379...]/<service>[/<db>]``
    asks the sentinels for the service's master (``?sentinel_password=`` if the sentinels
    have their own); ``redis[s]+cluster://[user:password@]host:port`` discovers the cluster
    from one node. Query options of redis-py's URLs (``ssl_ca_certs``, ...) apply too.
    Commands are never retried: a failure is reported at once, and the caller fails open.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    scheme, _, rest = url.partition("://")
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return _sentinel_master(scheme.startswith("rediss"), rest, options)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return RedisCluster.from_url(f"{scheme.split('+')[0]}://{rest}", **options)
    return redis.Redis.from_url(url, **options)


def _sentinel_master(tls: bool, rest: str, options: dict[str, Any]) -> redis.Redis:
    parts = urlsplit(f"sentinel://{rest}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = []
    for host in hosts.split(","):
        if host.startswith("["):  # [IPv6 address]:port
            name, _, port = host[1:].partition("]")
            port = port.lstrip(":")
        else:
            name, _, port = host.partition(":")
        nodes.append((name, int(port or 26379)))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("REDIS_URL: redis+sentinel:// needs the service name as its path")
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    sentinel_options = {
        **options,
        "ssl": tls,
        "username": query.get("sentinel_username"),
        "password": query.get("sentinel_password"),
    }
    sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_options, ssl=tls, **options)
    return sentinel.master_for(
        path[0],
        username=unquote(username) or None,
        password=unquote(password) or None,
        db=int(path[1]) if len(path) > 1 else 0,
    )


def _floats(values: Sequence[bytes]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _is_one(answer: Any) -> bool:
    return answer == 1


def _first_is_one(answer: Sequence[Any]) -> bool:
    return answer[0] == 1


def _first(answer: Sequence[bytes]) -> float:
    return float(answer[0])


def _second_int(answer: Sequence[Any]) -> int:
    return int(answer[1])


# Operations that give back what only their own call holds (a slot, a request id), each
# acting only for that call's uid: harmless to run twice, so sent again when lost.
HARMLESS = frozenset({"release", "unclaim", "settle"})


def _evalsha(script: Any, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
    """The command that runs ``script`` (a registered script) on ``keys`` with ``args``."""
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def _log_lost(count: int, again: list[tuple[str, tuple]], exc: Exception) -> None:
    log.warning("ratelimit: %d posted command(s) failed or went unanswered: %s", count, exc)


class RedisStore:
    """The store operations as Lua scripts on one Redis (or Cluster, or Sentinel master).

    ``clock`` is for tests only: it replaces the server's ``TIME`` so that a scenario can
    be replayed against ``LocalStore`` step for step. Key expiry stays on Redis's clock.
    """

    def __init__(self, client: Any, clock: Callable[[], float] | None = None) -> None:
        self.client = client
        self.clock = clock
        prelude = (SCRIPTS / "prelude.lua").read_text()
        self._buckets, self._slots, self._claims, self._totals = (
            client.register_script(prelude + (SCRIPTS / f"{name}.lua").read_text())
            for name in ("buckets", "slots", "claims", "totals")
        )
        self._by_sha = {s.sha: s for s in (self._buckets, self._slots, self._claims, self._totals)}
        # What becomes of posted commands whose replies say they failed, or were never
        # read (``post_all``): how many, those of them that are harmless to send again
        # (``_again``), and why. The limiter counts them as failed open, and sends those
        # again once Redis answers.
        self.on_lost: Callable[[int, list[tuple[str, tuple]], Exception], None] = _log_lost
        # Redis Cluster routes each command to its key's node: redis-py's own path there.
        # In a gevent worker, greenlets asking while a round trip is in flight share the
        # next one (``pipelining``).
        self._direct: Any = None
        self._conns: redisconns.Connections | None = None
        if not isinstance(client, RedisCluster):
            # Scripts are loaded on every new connection, so that a posted command finds
            # its script (a restarted Redis has none, and it closed every connection).
            loads = [("SCRIPT", "LOAD", script.script) for script in self._by_sha.values()]
            self._conns = redisconns.Connections(
                client.connection_pool,
                _ERRORS,
                self._commands_lost,
                loads,
                lambda command: self._again(command) is not None,
            )
            self._direct = self._conns
            if monkey.is_module_patched("socket"):
                self._direct = pipelining.Pipeline(self._conns.exchange)

    def _now(self) -> str | float:
        return "" if self.clock is None else self.clock()

    def _run(self, script: Any, keys: Sequence[str], args: list[Any]) -> Any:
        if self._direct is None:
            try:
                return script(keys=list(keys), args=args)
            except _FAILURES as exc:
                raise StoreDown(f"{type(exc).__name__}: {exc}") from exc
        (answer,) = self._scripts([(script, keys, args)])
        return answer

    def _scripts(self, calls: Sequence[tuple[Any, Sequence[str], list[Any]]]) -> list[Any]:
        """Run scripts in one round trip (``_direct``); their answers.

        EVALSHA only: a script Redis lost (``SCRIPT FLUSH``; a restart closes the
        connections, and new ones load every script) is loaded, and the calls it refused
        are run again, one by one, after the posted ones it refused. Whatever else Redis
        answers with an error, or a connection that fails, raises ``StoreDown``.
        """
        assert self._direct is not None
        commands = [_evalsha(script, keys, args) for script, keys, args in calls]
        try:
            out = self._direct.exchange(commands)
            if self._conns is not None and self._conns.rerun:
                self._rerun_posted()  # sent before these: run before these run again
            for i, answer in enumerate(out):
                if isinstance(answer, redis.exceptions.NoScriptError):
                    script = calls[i][0]
                    self.client.script_load(script.script)
                    (out[i],) = self._direct.exchange([commands[i]])
        except _FAILURES as exc:
            raise StoreDown(f"{type(exc).__name__}: {exc}") from exc
        for answer in out:
            if isinstance(answer, Exception):
                raise StoreDown(f"{type(answer).__name__}: {answer}")
        return out

    def _rerun_posted(self) -> None:
        """Posted commands Redis refused for want of their script: load it, run them."""
        assert self._conns is not None
        commands, self._conns.rerun = self._conns.rerun, []
        try:
            for sha in {command[1] for command in commands}:
                self.client.script_load(self._by_sha[sha].script)
            answers = self._direct.exchange(commands)
        except _FAILURES as exc:
            self._commands_lost(commands, exc)
            return
        failed = [
            c for c, answer in zip(commands, answers, strict=True) if isinstance(answer, Exception)
        ]
        if failed:
            self._commands_lost(failed, next(a for a in answers if isinstance(a, Exception)))

    def _commands_lost(self, commands: Sequence[Sequence[Any]], exc: Exception) -> None:
        again = [op for op in map(self._again, commands) if op is not None]
        self.on_lost(len(commands), again, exc)

    def _again(self, command: Sequence[Any]) -> tuple[str, tuple] | None:
        """The operation a lost command was (``_operation``'s name and arguments) if it
        is harmless to send again, whether or not it ran: a slot's release, a request
        id's release or settle (each acts only for its own call's uid). None for the
        rest (a charge run twice would charge twice)."""
        _, sha, count, *rest = command
        keys, argv = rest[:count], rest[count:]
        if sha == self._slots.sha and argv[0] == "release":
            return "release", (keys[0], argv[1])
        if sha == self._claims.sha and argv[0] == "release":
            return "unclaim", (keys[0], argv[1])
        if sha == self._claims.sha and argv[0] == "settle":
            return "settle", (keys[0], argv[1], argv[4], argv[2])
        return None

    def run_all(self, operations: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Several operations (``(method name, args)``) in one round trip; their results.

        Redis Cluster refuses scripts in pipelines: there they run one by one.
        """
        if self._direct is None:
            return [self._one(name, *args) for name, args in operations]
        calls = [self._operation(name, *args) for name, args in operations]
        answers = self._scripts([(script, keys, args) for script, keys, args, _ in calls])
        return [convert(answer) for (_, _, _, convert), answer in zip(calls, answers, strict=True)]

    def post_all(self, operations: Sequence[tuple[str, tuple]]) -> None:
        """``run_all`` without waiting for the results: the operations are sent at once
        (Redis runs them before anything this process sends later), their replies read
        with a later round trip; a failure then reaches ``on_lost``. What a finished call
        owes goes this way: its answer needs none of it. With a round trip in flight (a
        busy worker) they join the next one and are waited for, as ``run_all``: written
        one by one they cost Redis a read each where a batch costs one (its CPU per call
        +30% at 50 clients). Redis Cluster: ``run_all``.
        """
        if self._conns is None or getattr(self._direct, "busy", False):
            self.run_all(operations)
            return
        calls = [self._operation(name, *args) for name, args in operations]
        try:
            self._conns.post([_evalsha(script, keys, argv) for script, keys, argv, _ in calls])
        except _FAILURES as exc:
            raise StoreDown(f"{type(exc).__name__}: {exc}") from exc

    def _one(self, name: str, *args: Any) -> Any:
        """One of ``run_all``'s operations on its own."""
        script, keys, argv, convert = self._operation(name, *args)
        return convert(self._run(script, keys, argv))

    def _operation(self, name: str, *args: Any) -> tuple[Any, list[str], list[Any], Any]:
        """What one operation sends (script, keys, args) and its result reader: the
        single methods below and ``run_all`` alike."""
        if name == "settle":
            key, uid, answer, ttl = args
            return self._claims, [key], ["settle", uid, ttl, self._now(), answer], _is_one
        if name == "unclaim":
            key, uid = args
            return self._claims, [key], ["release", uid, 0, self._now()], _is_one
        if name == "release":
            key, member = args
            return self._slots, [key], ["release", member, 0, 0, self._now()], _second_int
        if name == "refresh":
            key, member, ttl = args
            return self._slots, [key], ["refresh", member, 0, ttl, self._now()], _first_is_one
        if name == "keep_claim":
            key, uid, ttl = args
            return self._claims, [key], ["keep", uid, ttl, self._now()], _is_one
        if name == "charge":  # and (floor, channel, message) to publish at or below it
            key, bucket, amount, *low = args
            argv = self._bucket_args("charge", [bucket], amount) + low
            return self._buckets, [key], argv, _first
        if name in ("add", "raise_to"):
            key, amount, ttl = args
            return self._totals, [key], [name.removesuffix("_to"), amount, ttl], int
        raise ValueError(f"run_all: no operation {name!r}")

    def _bucket_args(self, mode: str, buckets: Sequence[Bucket], amount: float | None) -> list:
        args: list[Any] = [mode, self._now()]
        for bucket in buckets:
            args += [bucket.capacity, bucket.rate, bucket.cost if amount is None else amount]
        return args

    def admit(
        self,
        keys: Sequence[str],
        buckets: Sequence[Bucket],
        slot: Slot | None = None,
        budget: Budget | None = None,
    ) -> Verdict:
        """Take each bucket's cost and the slot, all or none, under the budget (see
        ``LocalStore.admit``)."""
        mode, keys, extra = "admit", list(keys), []
        if slot is not None:
            key, member, limit, ttl = slot
            mode, extra = mode + "+slot", [member, limit, ttl]
            keys.append(key)
        if budget is not None:
            total, limit, mark, ttl = budget
            mode = mode + "+budget"
            keys += [total, mark]
            extra += [str(limit), ttl]
        out = self._run(self._buckets, keys, [*self._bucket_args(mode, buckets, None), *extra])
        refused = int(out[1])
        spent, seed = None, False
        if budget is not None:
            spent, seed, out = int(out[-2]), out[-1] == b"1", out[:-2]
        return Verdict(
            out[0] == b"1",
            _floats(out[3:]),
            float(out[2]),
            refused - 1 if refused else None,
            spent,
            seed,
        )

    def charge(self, key: str, bucket: Bucket, amount: float) -> float:
        """Take ``amount`` tokens (a debt if there are fewer); return the level."""
        return self._one("charge", key, bucket, amount)

    def peek(self, keys: Sequence[str], buckets: Sequence[Bucket]) -> tuple[float, ...]:
        """Each bucket's level now, changing nothing."""
        return _floats(self._run(self._buckets, keys, self._bucket_args("peek", buckets, None)))

    def acquire(self, key: str, member: str, limit: int, ttl: float) -> tuple[bool, int]:
        """Hold one of ``limit`` slots for ``ttl`` seconds; return (held, slots in use)."""
        held, used = self._run(self._slots, [key], ["acquire", member, limit, ttl, self._now()])
        return held == 1, int(used)

    def refresh(self, key: str, member: str, ttl: float) -> bool:
        """Extend a held slot by ``ttl`` from now; False if it had expired."""
        return self._one("refresh", key, member, ttl)

    def release(self, key: str, member: str) -> int:
        """Give a slot back; return the slots still in use."""
        return self._one("release", key, member)

    def claim(
        self,
        key: str,
        uid: str,
        ttl: float,
        age: float = 0.0,
        mark: str | None = None,
        grace: float = 0.0,
    ) -> Claim | None:
        """Claim a request id for call ``uid``; None if claimed, else the current holder.

        ``age``: seconds ``uid`` has held the id already (a claim taken again after the
        store lost it): the claim says it started then, not now. ``mark`` (the key's,
        see claims.lua): a claim taken within ``grace`` seconds of the store's first
        claim of the key's ids answers ``uid`` itself as the holder: claimed, but the
        store may have lost the claim of a call still in flight (``LocalStore.claim``)."""
        argv: list[Any] = ["claim", uid, ttl, self._now()]
        keys = [key]
        if mark is not None:
            keys.append(mark)
            argv += [age, grace]
        elif age > 0:
            argv.append(age)
        out = self._run(self._claims, keys, argv)
        if not out:
            return None
        return Claim(out[0].decode(), float(out[1]), float(out[2]), out[3].decode() or None)

    def keep_claim(self, key: str, uid: str, ttl: float) -> bool:
        """Extend ``uid``'s claim by ``ttl`` from now; False if it is not the holder."""
        return self._one("keep_claim", key, uid, ttl)

    def settle(self, key: str, uid: str, answer: str, ttl: float) -> bool:
        """Keep ``answer`` under ``uid``'s claim for ``ttl`` from now; False if not the holder."""
        return self._one("settle", key, uid, answer, ttl)

    def unclaim(self, key: str, uid: str) -> bool:
        """Release ``uid``'s claim (not a settled one); False if it was not the holder."""
        return self._one("unclaim", key, uid)

    def add(self, key: str, amount: int, ttl: float) -> int:
        """Add ``amount`` to a total kept ``ttl`` seconds from now; return the total."""
        return self._one("add", key, amount, ttl)

    def raise_to(self, key: str, amount: int, ttl: float) -> int:
        """Raise a total to ``amount`` if it is below (never lower it), kept ``ttl``
        seconds from now; return the total."""
        return self._one("raise_to", key, amount, ttl)

    def total(self, key: str) -> int:
        """A total (0 when there is none)."""
        return int(self._run(self._totals, [key], ["peek", 0, 0]))

    def publish(self, channel: str, message: str) -> None:
        """Send ``message`` to every subscriber of ``channel``; return once Redis has
        written it to each of them.

        Redis writes a PUBLISH's answer and the subscribers' messages in the same turn of
        its loop, client by client, and the answer may go first: a caller told "done"
        could reach another instance before the message did (with 4,000 other
        subscribers on the channel, a revoked key's next call was let through 7 times in
        10). A command sent after the answer is read in a later turn, which starts once
        every write of the turn before is done: its answer means the message is on its
        way to every subscriber. (On a Cluster, subscribers of other nodes get it through
        the cluster bus, a moment later.)
        """
        try:
            self.client.publish(channel, message)
            self.client.ping()
        except _FAILURES as exc:
            raise StoreDown(f"{type(exc).__name__}: {exc}") from exc

    def subscribe(self, channel: str) -> Subscription:
        """Subscribe to ``channel``."""
        try:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(channel)
        except _FAILURES as exc:
            raise StoreDown(f"{type(exc).__name__}: {exc}") from exc
        return Subscription(pubsub, _SUBSCRIBER_ERRORS)


def open_store(config: Mapping[str, Any]) -> RedisStore | None:
    """The shared store named by REDIS_URL, or None when limits stay in process."""
    url = config.get("REDIS_URL")
    if not url:
        return None
    timeout = float(config["REDIS_TIMEOUT"])
    return RedisStore(connect(str(url), timeout, float(config["REDIS_CONNECT_TIMEOUT"])))
