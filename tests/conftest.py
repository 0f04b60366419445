"""Fixtures: databases on SQLite and PostgreSQL, the app, the fake upstream, real servers.

Patch first, as gunicorn's gevent worker does before it loads the app: peewee must
be imported after ``threading`` is patched (see gateway/db.py).
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlparse, urlunparse  # noqa: E402

import gevent  # noqa: E402
import peewee  # noqa: E402
import pytest  # noqa: E402

from gateway import auth, create_app, resolver, spend, srvlog  # noqa: E402
from gateway.db import database, migrate, open_database  # noqa: E402
from gateway.model_limits import model_limits  # noqa: E402
from gateway.recorder import Recorder, recorder  # noqa: E402
from tests import pools  # noqa: E402
from tests.pg_spares import Spares  # noqa: E402
from tests.recorders import make_recorder  # noqa: E402
from tests.servers import (  # noqa: E402
    ADMIN_SECRET,
    ENCRYPTION_KEY,
    Disk,
    FakeUpstream,
    Gateway,
    PostgresCluster,
    RedisServer,
    hub_waits,
    reap,
    stopped_wrong,
)

# Name lookups as a worker makes them: an address without the pool, a name with a
# wait that a lost wake-up cannot make endless (one once hung a test process).
resolver.install()

# A pytest-xdist worker (``make test`` runs two) waits for its next test on a
# threading.Event, gevent's once patched, that execnet's receiver thread sets. With
# nothing scheduled, gevent's loop would give up at once ("LoopExit: This operation
# would block forever") instead of waiting for that: a timer that never fires keeps it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _KEEP_LOOP = gevent.get_hub().loop.timer(3600, 3600)
    _KEEP_LOOP.start(lambda: None)

# A test hung past pyproject's faulthandler_timeout is ended by faulthandler, which prints
# only threads' stacks: in a gevent process, the hub's. ``HANG_REPORT`` seconds before
# that, a native thread signals the process, and the handler (run by the hub, whose
# loop runs Python's signal handlers) prints every greenlet's stack and what each waits
# for, gevent's own report, so that a hang says where.
HANG_REPORT = 20.0
_native_thread = monkey.get_original("_thread", "start_new_thread")
_native_lock = monkey.get_original("_thread", "allocate_lock")
_hung = ""  # what the report is about


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    limit = float(item.config.getini("faulthandler_timeout") or 0)
    if limit <= HANG_REPORT:
        return (yield)
    over = _native_lock()
    over.acquire()
    _native_thread(_signal_if_hung, (over, limit - HANG_REPORT, item.nodeid))
    try:
        return (yield)
    finally:
        over.release()


def _signal_if_hung(over: Any, after: float, nodeid: str) -> None:
    """In a native thread: if the test is not over ``after`` seconds on, have the
    process report its greenlets (greenlet 3 shows a thread's frames only to itself)."""
    if not over.acquire(timeout=after):
        global _hung
        _hung = f"{nodeid} still running after {after:.0f} s"
        os.kill(os.getpid(), signal.SIGUSR2)


def _report_greenlets(signum: int, frame: Any) -> None:
    import gevent.util

    lines = [f"\n=== {_hung}: its greenlets ===", *gevent.util.format_run_info()]
    os.write(_real_stderr, ("\n".join(lines) + "\n").encode("utf-8", "replace"))


_real_stderr = 2


def pytest_configure(config: pytest.Config) -> None:
    global _real_stderr
    _real_stderr = os.dup(2)  # as faulthandler's own: no test's capture holds it
    signal.signal(signal.SIGUSR2, _report_greenlets)


PG_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL")
# How the fixtures stop a gateway once its test is over: gunicorn's quick shutdown, in
# well under a second, and not waited for (``stop_behind``). A graceful stop (SIGTERM)
# takes 1.5-2 s, mostly gunicorn's 1 s polls, and the tests of shutdown send their own
# signals and check what it does.
QUICK = signal.SIGQUIT
BACKENDS = ["sqlite", "postgres"] if PG_URL else ["sqlite"]


def _with_database(url: str, name: str) -> str:
    parts = urlparse(url)
    return urlunparse(parts._replace(path=f"/{name}"))


def _pg_admin() -> peewee.Database:
    return open_database(PG_URL)


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A migrated database per backend, copied for every test (faster than migrating).

    On PostgreSQL the copies are made ahead and dropped behind by ``pg_spares``.
    """
    out: dict[str, Any] = {}
    sqlite_path = tmp_path_factory.mktemp("template") / "gateway.db"
    db = open_database(f"sqlite:///{sqlite_path}")
    migrate(db)
    db.close()
    out["sqlite"] = str(sqlite_path)
    if PG_URL:
        name = f"gw_tpl_{uuid.uuid4().hex[:10]}"
        admin = _pg_admin()
        with admin.connection_context():
            admin.execute_sql(f'CREATE DATABASE "{name}"')
        db = open_database(_with_database(PG_URL, name))
        migrate(db)
        db.close_all()
        out["postgres"] = Spares(PG_URL, name)
    yield out
    if PG_URL:
        out["postgres"].close()  # its copies first: they are made from the template
        with admin.connection_context():
            admin.execute_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close_all()


@contextmanager
def _fresh_database(backend: str, templates: dict, directory: Path) -> Iterator[str]:
    """A migrated database copied from the template; dropped afterwards (PostgreSQL)."""
    if backend == "sqlite":
        path = directory / "gateway.db"
        shutil.copy(templates["sqlite"], path)
        yield f"sqlite:///{path}"
        return
    spares = templates["postgres"]
    name = spares.take()
    yield _with_database(PG_URL, name)
    spares.give_back(name)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, templates: dict, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database for one test, on each backend in turn."""
    with _fresh_database(request.param, templates, tmp_path) as url:
        yield url


@contextmanager
def _test_app(database_url: str, directory: Path) -> Iterator:
    """The app on this database; at the end, everything it wrote is written."""
    # The process's key cache knows what another test's database had, under the same
    # ids as this one's: a new process knows nothing (CACHE_TTL 0 reads through).
    auth.keys.load([])
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "ADMIN_SUPER_SECRET": ADMIN_SECRET,
            "ENCRYPTION_KEYS": ENCRYPTION_KEY,
            "JOURNAL_DIR": str(directory / "journal"),
            "SWEEP_INTERVAL": 0,
            "RETENTION_INTERVAL": 0,
            "BACKOFF_MIN": 0.01,
            "BACKOFF_MAX": 0.05,
            "CACHE_TTL": 0,
            "RECORDER_INTERVAL": 0,  # a flush waits for no batch to fill (fuzz: 16 -> 9 ms a case)
            "PROCESS_HEARTBEAT": 0,  # nobody sweeps a test app; its beat would outlive the test
        }
    )
    yield app
    assert recorder.flush(10), "recorder did not finish writing"
    # What this test logged and loaded belongs to its database, not the next test's.
    assert model_limits.wait(10), "per-model limits did not finish reloading"
    assert spend.seeder.wait(10), "budgeted keys' spend did not finish seeding"
    srvlog.handler.write(timeout=5)  # now, not at the writer's next turn (up to 1 s on)
    srvlog.handler.written_within(5)
    pools.release(database.obj)


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator:
    with _test_app(database_url, tmp_path) as app:
        yield app


@pytest.fixture
def rec(database_url: str, tmp_path: Path) -> Iterator[Recorder]:
    """A recorder of this process's own on this test's database (``tests.recorders``)."""
    database.initialize(open_database(database_url))
    started = make_recorder(tmp_path)
    yield started
    started.flush(5)
    started._group.kill()
    pools.release(database.obj)


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture
def runner(app):  # type: ignore[no-untyped-def]
    return app.test_cli_runner()


@pytest.fixture
def db(app) -> Iterator[peewee.Database]:  # type: ignore[no-untyped-def]
    """A connection for a test that reads or writes rows directly."""
    with database.connection_context():
        yield database


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    """An 8 MB tmpfs to fill: mounting one takes root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill takes root")
    path = tmp_path / "disk"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True)
    try:
        yield Disk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of the test's own, to stop and start (tests/servers.py)."""
    pg = PostgresCluster()
    yield pg
    pg.destroy()


@pytest.fixture
def gateway_factory(database_url: str, tmp_path: Path) -> Iterator:
    """Start real gunicorn gateways on this test's database; stopped at teardown."""
    started: list[Gateway] = []

    def start(**env: str) -> Gateway:
        gw = Gateway(database_url, tmp_path / f"instance{len(started)}", **env)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop_behind(QUICK)


@pytest.fixture
def gateway(gateway_factory) -> Gateway:  # type: ignore[no-untyped-def]
    return gateway_factory()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """module_database on each backend; on one only in a module with ``ONE_BACKEND = True``.

    One backend is for server modules whose behaviour does not depend on the database:
    PostgreSQL when there is one (what production runs). What the recorder writes is
    proven on both backends by the tests of the recorder and the records.
    """
    if "module_database" in metafunc.fixturenames:
        one = getattr(metafunc.module, "ONE_BACKEND", False)
        backends = BACKENDS[-1:] if one else BACKENDS
        metafunc.parametrize("module_database", backends, indirect=True, scope="module")


@pytest.fixture(scope="module")
def module_database(
    request: pytest.FixtureRequest, templates: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """One database (URL) and directory for a whole test module, on each backend in turn."""
    directory = tmp_path_factory.mktemp("module")
    with _fresh_database(request.param, templates, directory) as url:
        yield url, directory


@pytest.fixture(scope="module")
def module_app(module_database: tuple) -> Iterator:
    """The app on the module's database, for a module whose tests share one gateway.

    The models are bound to one database at a time: a module that uses this fixture
    does not also use ``app``.
    """
    url, directory = module_database
    with _test_app(url, directory) as app:
        yield app


@pytest.fixture(scope="module")
def module_gateway(request: pytest.FixtureRequest, module_database: tuple) -> Iterator[Gateway]:
    """One real gateway for a whole test module, on each backend in turn.

    For tests that keep apart by their own keys, models and call ids; the module's
    ``GATEWAY_ENV`` (a dict) adds environment variables.
    """
    url, directory = module_database
    gw = Gateway(url, directory / "instance", **getattr(request.module, "GATEWAY_ENV", {}))
    yield gw
    gw.stop_behind(QUICK)


@pytest.fixture(autouse=True)
def _no_stray_server_logs() -> Iterator[None]:
    """After each test, what the server-log handler still holds is dropped: it was
    logged by a test that never wrote it (no ``app`` fixture, whose teardown does), and
    would land in whichever test's database is current at the writer's next turn (a
    resolver test's warning once did, in a retention test's ``srv_logs``; later a
    recorder test's "repeated 11 more times", queued when its window closed)."""
    yield
    srvlog.handler.forget()


@pytest.fixture(autouse=True)
def _no_wait_in_the_hub() -> Iterator[None]:
    """After each test, no gateway it ran logged a wait in the hub (``hub_waits``)."""
    yield
    assert not (found := hub_waits()), f"a gateway waited in its hub: {found}"


@pytest.fixture(autouse=True)
def _gateways_stopped_well() -> Iterator[None]:
    """After each test, the gateways that fixtures left stopping (``stop_behind``) and
    that have exited since exited as meant: 0, or -9 after a test's ``kill()``. Their
    quick stops are not waited for, so one is looked at after the next test, or at the
    end: the failure names the test that stopped it."""
    yield
    if wrong := stopped_wrong():
        pytest.fail("\n\n".join(wrong), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _reap_gateways() -> Iterator[None]:
    """At the end, wait for the gateways that fixtures left stopping: each exited as
    meant, within a minute."""
    yield
    if wrong := reap():
        pytest.fail("\n\n".join(wrong), pytrace=False)


def _need_redis_server() -> None:
    """Tests of shared state start their own redis-server; CI must have it."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        pytest.skip("redis-server is not installed")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """This test's own redis-server (it may stop and restart it); killed at teardown."""
    _need_redis_server()
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the tests that only need one (each uses its own key prefix)."""
    _need_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
