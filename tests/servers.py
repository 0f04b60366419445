"""Real processes for tests and benchmarks: the fake upstream and gunicorn with the gateway."""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
ADMIN_SECRET = "test-admin-secret"
# One encryption key for every gateway and app a test starts: they share databases.
ENCRYPTION_KEY = "Wy4JyfkS3HBJbOI5FAlGrtd1wppwbiz3g8uvCo3DvUA="


# Ports handed out for servers that bind them later (gunicorn, redis-server, PostgreSQL):
# below the kernel's ephemeral range, so no outgoing connection takes one meanwhile (a
# port the kernel picked could be taken by a client socket before the server binds it),
# and a slice of its own for each pytest-xdist worker if the suite is ever run with it.
PORTS = range(15000, 32768)
_next_port: list[int] = []


def free_port() -> int:
    """A port nothing listens on now, and that this process has not handed out lately."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    size = len(PORTS) // count
    # A worker that replaces a crashed one (gw2 for gw0 of 2) takes the slice it left.
    first = PORTS.start + size * (int(worker) % count if worker.isdigit() else 0)
    if not _next_port:  # a random start: runs one after another do not reuse the same ports
        _next_port.append(first + random.randrange(size))
    for _ in range(size):
        port = _next_port[0]
        _next_port[0] = first + (port + 1 - first) % size
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or lingering in TIME_WAIT
                continue
            return port
    raise RuntimeError(f"no free port in {first}..{first + size - 1}")


def wait_until(
    check: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str | Callable[[], str] = "condition",
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``.

    ``what`` names what was waited for in the failure (a callable: read at the timeout,
    to say how far it got).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"{said}: not met within {timeout} s")
        time.sleep(interval)


class FakeUpstream:
    """tests/fake_upstream.py in its own process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fake_upstream.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self, call_id: str | None = None) -> list[dict]:
        params = {} if call_id is None else {"id": call_id}
        return requests.get(f"{self.url}/_log", params=params, timeout=5).json()

    def reset(self) -> None:
        requests.post(f"{self.url}/_reset", timeout=5)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Floor:
    """bench/floor.py in its own process (or ``processes`` of them sharing one socket): the
    bare gevent proxy the gateway is weighed against."""

    def __init__(self, upstream_url: str, log_path: Path, processes: int = 1) -> None:
        self.log_file = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "floor.py"),
                "--upstream",
                upstream_url,
                "--processes",
                str(processes),
            ],
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
        )
        line = self.proc.stdout.readline().split()
        if line[:1] != ["PORT"]:
            self.pids = [self.proc.pid]
            self.stop()
            raise RuntimeError(f"floor did not start: {line!r}")
        self.port = int(line[1])
        self.pids = [int(pid) for pid in line[3:]]  # the first is self.proc's
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for pid in self.pids[1:]:  # the forked ones are not self.proc's to reap
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()
        self.log_file.close()


class Gateway:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` with gevent workers, in its own process."""

    def __init__(
        self,
        database_url: str,
        instance: Path,
        workers: int = 1,
        output: int | None = None,
        **env: str,
    ) -> None:
        """``output``: a descriptor for its stdout and stderr (else ``log_path``)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = instance / "gunicorn.log"
        instance.mkdir(parents=True, exist_ok=True)
        environ = {
            **os.environ,
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "DATABASE_URL": database_url,
            "ADMIN_SUPER_SECRET": ADMIN_SECRET,
            "GATEWAY_ENCRYPTION_KEYS": ENCRYPTION_KEY,
            "GATEWAY_INSTANCE_PATH": str(instance),
            # Not a temporary directory of its own: a gateway killed in a test leaves it.
            "PROMETHEUS_MULTIPROC_DIR": str(instance / "metrics"),
            "GATEWAY_WORKERS": str(workers),
            "GATEWAY_ACCESS_LOG": "",
            "GATEWAY_BACKOFF_MIN": "0.01",
            "GATEWAY_BACKOFF_MAX": "0.05",
            # Tests make keys and use them at once: on a loaded machine the worker's read
            # of the new key (MIN_GAP, then keys and catalog) can take more than the 1 s
            # default, and the key would be refused as unknown.
            "GATEWAY_KEY_LOOKUP_WAIT": "5",
            **env,
        }
        self.environ = environ
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self._log_read = 0  # how far ``hub_waits`` has read the log
        self.expected_exit = 0  # gunicorn's master, on SIGTERM, SIGQUIT or SIGINT
        self.stopped_in = ""  # the test that left it stopping (``stop_behind``)
        _started.append(self)
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=environ,
            stdout=self.log_file if output is None else output,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._healthy, timeout=30)
        except AssertionError:
            self.proc.kill()  # hung at start: the error says so, not the stop
            self.proc.wait()
            raise RuntimeError(f"gateway did not start:\n{self.log()}") from None
        self.admin = requests.Session()
        self.admin.headers["Authorization"] = f"Bearer {ADMIN_SECRET}"

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except (requests.ConnectionError, requests.Timeout):  # listening, worker not up yet
            return False

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text()

    def command(self, *args: str) -> subprocess.CompletedProcess:
        """``flask --app wsgi <args>`` as an operator runs it beside this gateway."""
        return subprocess.run(
            [sys.executable, "-m", "flask", "--app", "wsgi", *args],
            cwd=ROOT,
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def worker_pids(self) -> list[int]:
        """The gunicorn worker processes (children of the master)."""
        return children(self.proc.pid)

    def instance_store(self) -> tuple[int, str] | None:
        """The pid and socket of the master's instance store (two workers, no Redis)."""
        return instance_store(self.proc.pid)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """An admin API call that must succeed; returns the JSON."""
        resp = self.admin.request(method, f"{self.url}/api/admin{path}", timeout=10, **kwargs)
        assert resp.status_code < 300, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def setup_route(
        self,
        upstream_url: str,
        provider_type: str = "openai",
        system_name: str = "fake",
        remote_id: str = "fake",
        model_type: str = "chat",
        key: dict | None = None,
        **provider: Any,
    ) -> dict:
        """A provider, a model and a key (``key``: its fields); returns {"key", "provider",
        "model"}."""
        base = upstream_url + ("" if provider_type in ("anthropic", "azure") else "/v1")
        prov = self.api(
            "POST",
            "/providers",
            json={
                "name": f"{provider_type}-{free_port()}",
                "type": provider_type,
                "baseUrl": base,
                "apiKey": "upstream-secret",
                **provider,
            },
        )
        model = self.api(
            "POST",
            "/models",
            json={
                "providerId": prov["id"],
                "systemName": system_name,
                "remoteId": remote_id,
                "modelType": model_type,
            },
        )
        made = self.api("POST", "/apiKey", json={"comment": "test", **(key or {})})
        return {"key": made["key"], "key_id": made["id"], "provider": prov, "model": model}

    def records(self, table: str = "completions", **params: Any) -> list[dict]:
        """Every record of ``table`` (``completions`` or ``embeddings``) the filters in
        ``params`` match, newest first, read in pages of ``limit`` (1,000).

        Not only the first page: a test that made more calls than a page holds (a fast
        machine made 1,179 in two seconds) waited for records it could never see. The
        pages go by offset, so a row written between two of them pushes the rest down
        by one, and the next page repeats a row already read and hides another: such a
        read is made again, whole.
        """
        size = params.pop("limit", 1000)
        while True:
            rows: list[dict] = []
            while True:
                query = {**params, "limit": size, "offset": len(rows)}
                page = self.api("GET", f"/{table}", params=query)["data"]
                rows += page
                if len(page) < size:
                    break
            if len({row["id"] for row in rows}) == len(rows):
                return rows

    def metric(self, name: str) -> float:
        """The sum of /metrics' samples named ``name`` (a 200 answer, within 5 s)."""
        from prometheus_client.parser import text_string_to_metric_families

        answer = requests.get(f"{self.url}/metrics", timeout=5)
        assert answer.status_code == 200
        families = text_string_to_metric_families(answer.text)
        return sum(s.value for f in families for s in f.samples if s.name == name)

    def marked_calls(self, key: str, count: int, model: str = "gpt") -> list[str]:
        """``count`` chat calls through the openai SDK, JSON and streamed in turn, the
        i-th prompt marked ``call-<i>`` (``marker``); the texts they answered."""
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)
        texts = []
        for i in range(count):
            messages = [{"role": "user", "content": f"call-{i:03d} tell me a story"}]
            if i % 2:
                pieces = client.chat.completions.create(model=model, messages=messages, stream=True)
                texts.append("".join(c.choices[0].delta.content or "" for c in pieces if c.choices))
            else:
                answer = client.chat.completions.create(model=model, messages=messages)
                texts.append(answer.choices[0].message.content)
        return texts

    def wait_final(
        self, count: int, timeout: float = 20.0, table: str = "completions", **params: Any
    ) -> list[dict]:
        """Wait until ``count`` records exist and none is pending; return them."""

        def done() -> list[dict] | None:
            rows = self.records(table, **params)
            if len(rows) >= count and all(r["status"] != "pending" for r in rows):
                return rows
            return None

        return wait_until(done, timeout=timeout, interval=0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit; its code (0).

        Fails if it had to be killed after ``timeout`` (hung at shutdown), or exited
        with another code than 0 (crashed at shutdown, or before it): unless the test
        crashed it on purpose with ``kill()``.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        in_time = self._wait(timeout)
        self.log_file.close()
        if wrong := self.exited_wrong(in_time, timeout):
            raise AssertionError(wrong)
        return self.proc.returncode

    def kill(self) -> None:
        """``kill -9`` of the master, as a crash (its workers, orphaned, exit on their
        own): the one way a test ends a gateway that its stop then takes as meant."""
        self.expected_exit = -signal.SIGKILL
        self.proc.kill()
        self.proc.wait()

    def stop_behind(self, sig: int = signal.SIGQUIT) -> None:
        """Tell it to stop and go on: ``stopped_wrong()`` after each test, and ``reap()``
        at the end, look at its exit later (as ``stop`` does).

        For fixtures done with a gateway: its quick shutdown (about half a second,
        mostly gunicorn's polls) runs while the next test starts.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if self not in _stopping:  # a test's own stop_behind, then its fixture's
            self.stopped_in = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
            _stopping.append(self)

    def _wait(self, timeout: float) -> bool:
        """Wait for the exit; False if it had to be killed after ``timeout``."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False
        return True

    def exited_wrong(self, in_time: bool = True, timeout: float = 0.0) -> str | None:
        """What was wrong with its exit (its log's end), if anything was."""
        code = self.proc.returncode
        if in_time and code == self.expected_exit:
            return None
        of = f" (stopped behind by {self.stopped_in})" if self.stopped_in else ""
        if not in_time:
            wrong = f"gateway {self.proc.pid}{of} still running {timeout} s after its stop: killed"
        else:
            wrong = f"gateway {self.proc.pid}{of} exited with {code}, not {self.expected_exit}"
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-40:]
        except FileNotFoundError:  # its folder went with its test
            tail = ["(its log is gone)"]
        return wrong + "; its log ends:\n" + "\n".join(tail)


def stop_all(servers: Iterable[Any]) -> None:
    """``stop()`` each (a ``finally``'s cleanup: gateways, and the floor or fake upstream
    beside them): all are stopped before one's failure is raised."""
    wrong = []
    for server in servers:
        try:
            server.stop()
        except AssertionError as exc:
            wrong.append(str(exc))
    assert not wrong, "\n\n".join(wrong)


# Gateways told to stop by stop_behind() and not waited for yet.
_stopping: list[Gateway] = []


def marker(value: Any) -> str:
    """The ``call-<i>`` mark of a prompt (``Gateway.marked_calls``), in a record or a body."""
    return json.dumps(value).split("call-", 1)[1][:3]


def post_on_socket(
    gw: Gateway,
    path: str,
    body: dict,
    key: str,
    headers: dict[str, str] | None = None,
    rcvbuf: int = 0,
) -> socket.socket:
    """``body`` posted to ``path`` on a raw socket of its own, left for the caller to read
    (or not): ``rcvbuf`` sets its receive buffer first (a client whose reads the gateway's
    writes outrun)."""
    payload = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", gw.port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


# Every gateway started by this process whose log ``hub_waits`` may not have read whole.
_started: list[Gateway] = []
# What a worker logs when something waited where only the hub runs (a relay's pump).
HUB_WAIT = "BlockingSwitchOutError"


def hub_waits() -> list[str]:
    """The log lines, since the last look, in which a gateway's code waited in the hub.

    Pumps run in the hub's callbacks (``gateway/relay.py``), where a wait raises: the
    call ends as the gateway's error. Every test that streams through a gateway runs
    them there, so after each test (``conftest``) no gateway's log may say so.
    """
    found = []
    for gw in list(_started):
        done = gw.proc.poll() is not None
        try:
            with open(gw.log_path, "rb") as f:
                f.seek(gw._log_read)
                text = f.read()
        except FileNotFoundError:  # its folder went with its test
            text = b""
        gw._log_read += len(text)
        found += [line for line in text.decode(errors="replace").splitlines() if HUB_WAIT in line]
        if done:
            _started.remove(gw)
    return found


def stopped_wrong() -> list[str]:
    """Of the gateways ``stop_behind()`` left stopping that have exited since: what was
    wrong with each exit (``Gateway.exited_wrong``). Those still stopping stay for the
    next look, or ``reap()``."""
    wrong = []
    for gw in [gw for gw in _stopping if gw.proc.poll() is not None]:
        _stopping.remove(gw)
        gw.log_file.close()
        wrong += filter(None, [gw.exited_wrong()])
    return wrong


def reap(timeout: float = 60.0) -> list[str]:
    """Wait for every gateway that stop_behind() left stopping; what was wrong with
    their exits (one still running after ``timeout`` is killed)."""
    wrong = []
    while _stopping:
        gw = _stopping.pop()
        in_time = gw._wait(timeout)
        gw.log_file.close()
        wrong += filter(None, [gw.exited_wrong(in_time, timeout)])
    return wrong


def own_route(gw: Gateway, upstream_url: str, remote_id: str, **kwargs: Any) -> dict:
    """``setup_route`` with a model name no other test uses (``route["name"]``).

    For tests that share one gateway (``module_gateway``): each calls its own model
    with its own key, and reads back the records of that key.
    """
    name = f"own-{uuid.uuid4().hex[:10]}"
    route = gw.setup_route(upstream_url, system_name=name, remote_id=remote_id, **kwargs)
    return {**route, "name": name}


class RedisServer:
    """``redis-server`` on a free port in its own process, stoppable and restartable.

    ``extra`` arguments go to redis-server as they are (``--requirepass``, cluster or
    sentinel options); ``directory`` holds its files.
    """

    def __init__(self, directory: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        """Start (again, on the same port and with empty data)."""
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        no_persistence = ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *where, *no_persistence, *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_until(self.answers, timeout=10)

    def answers(self) -> bool:
        """True when it answers PING (or asks for a password)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command with redis-cli; return its output."""
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, check=True, timeout=10
        ).stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_VOCABULARY = [f"{w:x}{w * 7919 % 65521:x}" for w in range(4000)]


def varied_text(seed: int, words: int) -> str:
    """``words`` words of a 4,000-word vocabulary in an order of ``seed``'s own: text
    that no two calls share, work for a full-text index."""
    return " ".join(_VOCABULARY[(seed * 37 + j * 11) % len(_VOCABULARY)] for j in range(words))


_HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


@contextlib.contextmanager
def sqlite_lock_held(path: Path | str, seconds: float) -> Iterator[None]:
    """Another process (another worker's recorder, writing a batch) holds the SQLite
    database's write lock for ``seconds`` from the start of the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    try:
        yield
    finally:
        assert holder.wait(seconds + 5) == 0
        holder.stdout.close()


def _all_children(pid: int) -> list[int]:
    """Of every thread of ``pid``: the master's instance store is its keeper thread's."""
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in path.read_text().split()]
    return found


def _command(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def running(pid: int) -> bool:
    """Whether process ``pid`` runs: False once it is gone, or has exited and waits for
    its parent to reap it (a zombie, state Z in /proc/PID/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # gone, or being reaped as it is read
        return False


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (gunicorn's master: its workers, not its
    instance store). Not one that has exited and is not reaped yet: a store the keeper
    replaced, whose command line is then empty, was counted as a third worker."""
    return [
        child
        for child in _all_children(pid)
        if running(child) and "gateway.storeprocess" not in _command(child)
    ]


def instance_store(pid: int) -> tuple[int, str] | None:
    """The pid and socket of the instance store process ``pid`` started, if one runs."""
    for child in _all_children(pid):
        command = _command(child)
        if "gateway.storeprocess" in command:
            return child, command[command.index("gateway.storeprocess") + 1]
    return None


def unreachable(database_url: str) -> Any:
    """A database handle on the test's backend where nothing answers."""
    import peewee

    from gateway.db import open_database

    if database_url.startswith("sqlite"):
        return peewee.SqliteDatabase("/proc/no-such-dir/gateway.db", autoconnect=False)
    return open_database("postgresql://postgres@127.0.0.1:1/nowhere")


@contextlib.contextmanager
def away(replacement: Any) -> Iterator[None]:
    """Inside the block the gateway's database handle is ``replacement`` (``unreachable``
    or a database that never answers): every query fails as it does in an outage."""
    from gateway.db import database

    real = database.obj
    database.initialize(replacement)
    try:
        yield
    finally:
        database.initialize(real)


@dataclass
class Disk:
    """A small tmpfs of a test's own (``disk`` in conftest), filled and freed at will."""

    path: Path

    def fill(self) -> None:
        """Write a file until the disk refuses a single byte more."""
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (65536, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)

    def free(self) -> None:
        (self.path / "filler").unlink()

    def read_only(self, yes: bool = True) -> None:
        """Remount it read-only (as the kernel does a failing disk), or writable again."""
        mode = "remount,ro" if yes else "remount,rw"
        subprocess.run(["mount", "-o", mode, str(self.path)], check=True)


# A data directory initdb made, never started: each cluster starts from a copy of it
# (a tenth of a second) rather than an initdb of its own (most of a second).
_initdb_made: list[Path] = []


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("no initdb under /usr/lib/postgresql/*/bin: install postgresql")
    return Path(found[-1]).parent


def _as_postgres(command: list[str]) -> list[str]:
    """As root, the tools run as the postgres user (initdb and the server refuse root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _initdb_once() -> Path:
    """The data directory every cluster of this process is copied from."""
    if not _initdb_made:
        where = Path(tempfile.mkdtemp(prefix="gw-pg-initdb-"))
        if os.geteuid() == 0:
            shutil.chown(where, "postgres", "postgres")
        initdb = [str(_pg_bin() / "initdb"), "-D", str(where / "data"), "-U", "postgres"]
        subprocess.run(
            _as_postgres([*initdb, "-A", "trust", "--no-sync"]),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        atexit.register(shutil.rmtree, where, ignore_errors=True)
        _initdb_made.append(where / "data")
    return _initdb_made[0]


class PostgresCluster:
    """A PostgreSQL cluster of the test's own (a fresh initdb's copy, pg_ctl) on a free
    port.

    A test can stop and start it at will; other helpers' tests never notice. As root,
    the tools run as the postgres user (initdb refuses root).
    """

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        try:
            # -a keeps the owner (postgres) and the mode (0700) the server insists on.
            copy = ["cp", "-a", str(_initdb_once()), str(self.data)]
            subprocess.run(copy, check=True, stderr=subprocess.PIPE)
            self.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: object) -> None:
        command = _as_postgres([str(self.bin / tool), *map(str, args)])
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", self.data, "-l", self.dir / "server.log", "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: clients are disconnected at once)."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server's main process stopped (SIGSTOP), as a hung server or a paused VM
        is: the system still takes connections on its port, and nothing answers them."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    @contextlib.contextmanager
    def hung(self) -> Iterator[None]:
        """Every process of the server stopped, its connections' backends too: the
        system still acknowledges what is sent on open connections, and nothing answers
        (a paused VM; a partition that drops packets looks alike to a client)."""
        main = int((self.data / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{main}/task/{main}/children").read_text().split()
        pids = [main, *map(int, children)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a backend or autovacuum worker
                os.kill(pid, signal.SIGSTOP)  # that ended meanwhile: nothing to stop
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def destroy(self) -> None:
        """Stop the server if it runs and delete its files."""
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def pg_lock_awaited(conn: Any) -> bool:
    """Whether another backend of ``conn``'s database waits for a lock now (a psycopg
    connection): a test's cue to close a deadlock's cycle. Not pg_locks, which is the
    whole cluster's (other suites' waits show there too); and pg_stat_activity read
    afresh, where a transaction would see the snapshot it read first."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    found = conn.execute(
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    )
    return found.fetchone() is not None
