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
connections the store keeps (``_Connections``), and in a gevent worker those asked for
while a round trip is in flight share the next one (``pipelining``); what a finished
call owes is sent without waiting for its replies (``post_all``). Without
``REDIS_URL``, the same operations (``buckets.LocalStore``, same arithmetic) run in
the instance's store process (``instancestore``) or in this process. Redis down, slower
than ``REDIS_TIMEOUT`` or restarting: every operation fails open (allows), is counted
(``metrics``), and logs a warning at most once a minute; Redis is tried again
``REDIS_RETRY_AFTER`` seconds later, so limits hold again as soon as it answers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from gevent import monkey
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from gateway import pipelining, sockets
from gateway.buckets import Bucket, Budget, Claim, Slot, Verdict

log = logging.getLogger(__name__)


T = TypeVar("T")

SCRIPTS = Path(__file__).resolve().parent / "lua"
# What a command may raise when Redis is away, slow, restarting or misconfigured.
_FAILURES = (
    redis.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
    pipelining.Stopped,
)


class StoreDown(Exception):
    """Redis did not answer in time, or answered with an error."""


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


_forks = 0  # forks into this process since import: kept sockets are then the parent's


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class _Connections:
    """Scripts sent and read on connections of the client's pool, kept here between calls.

    redis-py's way to run a command (``client.evalsha``, a script object, a pipeline)
    costs about 60 µs of CPU around a round trip that takes about 100: its pool checks a
    connection out under a lock and polls it for stale bytes, then come its retry, event
    and metrics layers. That was half of what a limit added to a call. Here a command is
    packed, sent and read by the connection's own methods, and the connection waits in
    ``_idle`` for the next command; redis-py still connects (password, TLS, Sentinel's
    master), encodes and parses (with hiredis, its parser in C, where installed:
    requirements.txt has it).

    ``post`` sends commands whose replies nobody waits for (what a finished call owes):
    they go out at once, and their replies are read by the next exchange on the same
    connection, which goes back to the head of ``_idle`` for it. A round trip's cost to
    the worker is mostly waiting for the reply (the hub's poll, a wake-up, a read): a
    posted command shares its wake-up with the next exchange. Each new connection first
    runs the ``opening`` commands (the store's ``SCRIPT LOAD``s), so a posted script is
    known to the Redis it reaches. A posted reply that is an error is passed to ``lost``,
    except ``NoScriptError`` (``SCRIPT FLUSH`` meanwhile: the command never ran): it is
    kept in ``rerun`` for the store to load its script and run it again.

    A kept connection that Redis closed meanwhile (a restart, the server's idle
    ``timeout``) fails at once when used; the command is then sent once more on a
    connection just made, where redis-py's pool would have noticed at checkout. A failed
    exchange never comes back to ``_idle``: its next reply could be the one that was
    late (redis-py disconnects it too). Commands posted on it whose replies were not read
    may or may not have run: they are passed to ``lost``, never sent again from here
    (the store's owner sends again those that are harmless to run twice).
    """

    IDLE = 64  # connections kept; more at once are made, and given back to the pool
    OWED = 64  # posted commands a connection holds unread at most; then they are read

    def __init__(
        self,
        pool: Any,
        lost: Callable[[Sequence[Sequence[Any]], Exception], None],
        opening: Sequence[Sequence[Any]] = (),
        harmless: Callable[[Sequence[Any]], bool] = lambda command: False,
    ) -> None:
        self._pool = pool
        self._lost = lost
        self._opening = opening  # sent on each new connection first (SCRIPT LOAD)
        self._harmless = harmless  # a posted command that may be sent again if lost
        self._idle: list[Any] = []
        self._owed: dict[Any, list[Sequence[Any]]] = {}  # posted, replies not read yet
        self.rerun: list[Sequence[Any]] = []  # posted commands Redis had no script for
        self._forks = _forks  # not os.getpid() per command: a system call each

    def _take(self) -> tuple[Any, bool]:
        """A connection for the next write, and whether it was kept (the last one given
        back first: a posted command's replies are read by the next exchange)."""
        if self._forks != _forks:  # forked: the sockets are the parent's
            self._idle, self._owed, self._forks = [], {}, _forks
        if self._idle:
            return self._idle.pop(), True
        return self._new(), False

    def _new(self) -> Any:
        """A connection of the pool's, once it has answered the opening commands."""
        conn = self._pool.get_connection()
        if self._opening:
            try:
                self._send(conn, self._opening)
                failed = [
                    r for r in self._read(conn, len(self._opening)) if isinstance(r, Exception)
                ]
            except BaseException as exc:
                self._drop(conn, exc)
                raise
            if failed:
                self._drop(conn, failed[0])
                raise failed[0]
        return conn

    def exchange(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one write and read their replies, in order: each reply is
        the value, or the ``ResponseError`` that Redis answered in its place."""
        conn, replies = self._on_a_connection(self._send_and_read, commands)
        if len(self._idle) < self.IDLE:
            self._idle.append(conn)
        else:
            self._pool.release(conn)
        return replies

    def post(self, commands: Sequence[Sequence[Any]]) -> None:
        """Send ``commands`` in one write and go on; the next exchange reads their replies."""
        conn, _ = self._on_a_connection(self._send, commands)
        owed = self._owed.setdefault(conn, [])
        owed.extend(commands)
        if len(owed) >= self.OWED:  # no round trip read them (a key with no limits)
            try:
                self._read_owed(conn)
            except BaseException as exc:  # reported lost; this caller's were sent
                self._drop(conn, exc)
                return
        self._idle.append(conn)  # kept even past IDLE: its replies are to be read

    def _on_a_connection(
        self, work: Callable[[Any, Sequence[Sequence[Any]]], T], commands: Sequence[Sequence[Any]]
    ) -> tuple[Any, T]:
        """``work(connection, commands)`` on a kept connection, and once more on a new one
        if Redis had closed the kept one (it fails at once: nothing sent on it ran). A
        connection that failed is dropped. Commands posted on the closed one that are
        ``harmless`` to run twice (a slot or a request id given back) go first on the new
        one: the commands after them may need what they give back."""
        conn, kept = self._take()
        try:
            return conn, work(conn, commands)
        except redis.ConnectionError as exc:
            again, rest = [], []
            for command in self._owed.get(conn, []):
                (again if self._harmless(command) else rest).append(command)
            if again and kept:
                self._owed[conn] = rest
            self._drop(conn, exc)
            if not kept:
                raise
        except BaseException as exc:
            self._drop(conn, exc)
            raise
        conn = self._new()
        try:
            if again:
                self._send(conn, again)  # posted: read before the replies of ``commands``
                self._owed[conn] = again
            return conn, work(conn, commands)
        except BaseException as exc:
            self._drop(conn, exc)
            raise

    @staticmethod
    def _send(conn: Any, commands: Sequence[Sequence[Any]]) -> None:
        conn.send_packed_command(conn.pack_commands(commands), check_health=False)

    @staticmethod
    def _read(conn: Any, count: int) -> list[Any]:
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:  # the whole reply was read: still in step
                replies.append(exc)
        return replies

    def _send_and_read(self, conn: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands``; read the replies of those posted on ``conn`` before, then
        theirs."""
        self._send(conn, commands)
        self._read_owed(conn)
        return self._read(conn, len(commands))

    def _read_owed(self, conn: Any) -> None:
        """Read the replies of the commands posted on ``conn``; pass on what failed."""
        owed = self._owed.get(conn)
        if not owed:
            return
        replies = self._read(conn, len(owed))
        del self._owed[conn]
        for command, reply in zip(owed, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                self.rerun.append(command)
            elif isinstance(reply, Exception):
                self._lost([command], reply)

    def _drop(self, conn: Any, exc: BaseException) -> None:
        """Close a failed connection; what was posted on it and not answered is lost."""
        conn.disconnect()
        self._pool.release(conn)
        owed = self._owed.pop(conn, None)
        if owed:
            self._lost(owed, exc if isinstance(exc, Exception) else Exception(repr(exc)))


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
        self._conns: _Connections | None = None
        if not isinstance(client, RedisCluster):
            # Scripts are loaded on every new connection, so that a posted command finds
            # its script (a restarted Redis has none, and it closed every connection).
            loads = [("SCRIPT", "LOAD", script.script) for script in self._by_sha.values()]
            self._conns = _Connections(
                client.connection_pool,
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
        return Subscription(pubsub)


class Subscription:
    """One channel's messages: ``next`` waits for the next one, ``arrived`` says without
    waiting whether one has come that ``next`` has not returned yet.

    A subscriber only reads: a connection that died without a word (a partition, a
    NAT or load balancer that dropped it while idle, a host gone) never fails, and the
    worker heard no change again, with nothing to tell it that it missed them. So
    ``next`` sends a PING every ``PING_EVERY`` seconds, and one still unanswered at the
    next is ``StoreDown`` (the listener subscribes again, and forgets every cached key).
    """

    PING_EVERY = 5.0

    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub
        self._pinged: float | None = None  # when the PING not answered yet was sent
        self._ping_at = time.monotonic() + self.PING_EVERY

    def next(self, timeout: float) -> str | None:
        """The next message, waiting up to ``timeout`` seconds; None if none came."""
        try:
            self._ping()
            message = self._pubsub.get_message(timeout=timeout)
        except _FAILURES as exc:
            self._pubsub.close()
            raise StoreDown(f"{type(exc).__name__}: {exc}") from exc
        if message is not None and message.get("type") == "pong":
            self._pinged = None
        if message is None or message.get("type") != "message":
            return None
        return message["data"].decode()

    def _ping(self) -> None:
        now = time.monotonic()
        if now < self._ping_at:
            return
        if self._pinged is not None:
            raise redis.TimeoutError(f"no answer to a PING in {now - self._pinged:.1f} s")
        self._pubsub.ping()
        self._pinged, self._ping_at = now, now + self.PING_EVERY

    def arrived(self) -> bool:
        """Whether bytes wait on the subscription's socket (a system call, no switch)."""
        # redis-py's connection keeps its socket in ``_sock`` (None once closed); a
        # Cluster's pubsub has its node's connection once subscribed.
        sock = getattr(getattr(self._pubsub, "connection", None), "_sock", None)
        if sock is None:
            return False
        try:
            return sockets.readable(sock)
        except (OSError, ValueError):  # closed meanwhile: ``next`` says so
            return False


def open_store(config: Mapping[str, Any]) -> RedisStore | None:
    """The shared store named by REDIS_URL, or None when limits stay in process."""
    url = config.get("REDIS_URL")
    if not url:
        return None
    timeout = float(config["REDIS_TIMEOUT"])
    return RedisStore(connect(str(url), timeout, float(config["REDIS_CONNECT_TIMEOUT"])))
