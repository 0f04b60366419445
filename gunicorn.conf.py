"""gunicorn settings for the gateway: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Environment: PORT, HOST, GATEWAY_WORKERS, GATEWAY_WORKER_CONNECTIONS,
GATEWAY_GRACEFUL_TIMEOUT (in-flight calls and drains get this long after SIGTERM),
GATEWAY_WORKER_TIMEOUT (heartbeat watchdog), GATEWAY_MAX_REQUESTS (0: never recycle),
GATEWAY_ACCESS_LOG, GATEWAY_LOG_LEVEL, GATEWAY_LOG_BACKLOG; their defaults, and what
every setting may be (checked here first), are in gateway/config.py, read here as a file.
Nothing from the gateway is imported here, at module level or in a hook: this file runs
in the master, before gevent patches threading (see gateway/db.py), and the master's
imports are inherited by every worker it forks. What the master needs of the gateway
comes through the classes gunicorn imports: the logger (gateway/accesslog.py, which
imports no peewee; ``on_starting`` asks it to stop waiting for slow log readers) and the
worker. Finishing calls and records at exit is the worker class's job (gateway/worker.py).
"""

import glob
import os
import runpy
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = runpy.run_path(os.path.join(HERE, "gateway", "config.py"))
DEFAULTS = CONFIG["DEFAULTS"]
# The settings the environment gives, read as the app reads them (JSON where they can be).
SETTINGS = {**DEFAULTS, **CONFIG["from_environment"](os.environ)}

# A wrong value stops the start here, before anything is forked, with a line naming it.
if wrong := CONFIG["problems"](SETTINGS):
    sys.exit("The gateway cannot start:\n" + "\n".join(wrong))


def _env(name: str, prefix: str = "GATEWAY_") -> str:
    """A text setting as the environment wrote it."""
    return str(os.environ.get(prefix + name, DEFAULTS[name]))


bind = f"{_env('HOST', '')}:{int(SETTINGS['PORT'])}"
workers = int(SETTINGS["WORKERS"])
worker_class = "gateway.worker.GatewayWorker"
worker_connections = int(SETTINGS["WORKER_CONNECTIONS"])
graceful_timeout = int(SETTINGS["GRACEFUL_TIMEOUT"])
timeout = int(SETTINGS["WORKER_TIMEOUT"])  # heartbeat watchdog; kept beating while draining
keepalive = 75  # longer than typical load balancer idle timeouts
max_requests = int(SETTINGS["MAX_REQUESTS"])
max_requests_jitter = max_requests // 10
preload_app = False  # peewee must be imported after the worker patches threading
control_socket_disable = True  # several instances per user must not share one
accesslog = _env("ACCESS_LOG") or None
logger_class = "gateway.accesslog.RedactingLogger"  # gateway keys cut to their hint
errorlog = "-"
loglevel = _env("LOG_LEVEL").lower()

# Every worker writes its Prometheus values to files in one directory per instance,
# which must be named before a worker imports prometheus_client (gateway/metrics.py).
# In memory where the system has it (/dev/shm): a full disk then leaves them whole.
METRICS_DIR_PREFIX = "gateway-metrics-"
SHARED_MEMORY = "/dev/shm"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    in_memory = os.path.isdir(SHARED_MEMORY) and os.access(SHARED_MEMORY, os.W_OK | os.X_OK)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
        prefix=METRICS_DIR_PREFIX, dir=SHARED_MEMORY if in_memory else None
    )


# In a directory this file made: the master's pid, pid namespace and start (clock ticks
# after boot), so that a later start can tell the directory of a master killed before
# on_exit (kill -9, the OOM killer) from a live one's, and remove it: /dev/shm is
# memory, freed only by reboot. The start tells a live master from a process that took
# a dead one's pid.
METRICS_DIR_OWNER = "master"


def _pid_namespace():
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None  # not Linux: no way to tell, so nothing is removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _stat(pid):
    """Process ``pid``'s state (b"R", b"S", b"Z"...) and start in clock ticks after boot
    (/proc/<pid>/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _started(pid):
    """Process ``pid``'s start in clock ticks after boot, or None."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _owner(path):
    """The (pid, pid namespace, start or None) of the master that made metrics directory
    ``path``, or None: someone else's, its master not started yet, or from before the
    owner file. A file without the start (an older version's) gives None for it."""
    try:
        with open(os.path.join(path, METRICS_DIR_OWNER)) as fh:
            pid, namespace, *started = fh.read().split(" ")
        return int(pid), namespace, int(started[0]) if started else None
    except (OSError, ValueError):
        return None


def _running(owner):
    """True while the master ``owner`` names runs: its pid, started when it started."""
    pid, _, started = owner
    return _alive(pid) and (started is None or _started(pid) in (started, None))


def _remove_dead_masters_metrics(parent, namespace):
    """Remove the metrics directories of this namespace's masters that are gone."""
    for path in glob.glob(os.path.join(parent, METRICS_DIR_PREFIX + "*")):
        owner = _owner(path)
        # A pid of another namespace (a container sharing /dev/shm) says nothing here.
        if owner is not None and owner[1] == namespace and not _running(owner):
            shutil.rmtree(path, ignore_errors=True)


def on_starting(server):
    """Migrate and make sure there is an admin secret, in a separate process."""
    # A stalled log reader must not stop the master.
    server.log.never_wait_for_readers(int(SETTINGS["LOG_BACKLOG"]))
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(metrics_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(metrics_dir, "*.db")):
        os.remove(stale)  # a previous run's metrics
    namespace = _pid_namespace()
    if os.path.basename(metrics_dir).startswith(METRICS_DIR_PREFIX) and namespace:
        # The master's pid now, after gunicorn's --daemon fork, not at this file's load.
        with open(os.path.join(metrics_dir, METRICS_DIR_OWNER), "w") as fh:
            fh.write(f"{os.getpid()} {namespace} {_started(os.getpid())}")
        _remove_dead_masters_metrics(os.path.dirname(metrics_dir), namespace)
    host, _, port = bind.rpartition(":")
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "[::]") else host
    subprocess.run(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "wsgi",
            "prepare",
            "--url",
            f"http://{shown}:{port}",
        ],
        check=True,
        cwd=HERE,
    )
    _start_instance_store(server)


# Without REDIS_URL and with more than one worker, the workers share their limits,
# in-flight slots and request-id claims through one store process of this instance
# (gateway/storeprocess.py), whose socket they find in GATEWAY_INSTANCE_STORE. The
# master starts it, starts it again within INSTANCE_STORE_CHECK_EVERY if it dies or its
# socket or directory is removed (a /tmp cleaner: systemd-tmpfiles, tmpreaper; the
# workers fail open meanwhile, as without Redis), and stops it at exit; killed, the
# master leaves it behind for at most a second: it leaves when its master does.
INSTANCE_STORE_DIR_PREFIX = "gateway-store-"
INSTANCE_STORE_CHECK_EVERY = 0.5
INSTANCE_STORE_PID = "store.pid"  # the store removes it (storeprocess.PID_FILE)
INSTANCE_STORE_COMPLAIN_EVERY = 60.0  # seconds between errors about a path not to be had


def _keeping(server):
    """on_exit's word to the keeper, and the lock that makes a keeper's round and the
    stop one after the other (no store is started once the stop has begun).

    Not the directory's absence: a /tmp cleaner removes it too, and a keeper that
    stopped then left the instance's limits open until a restart. Kept on the arbiter:
    gunicorn runs this file again as a new module at every SIGHUP, on_exit is then the
    new module's, and the keeper started before still runs the first one's code; a
    module's own event was one the stop never set, and the keeper made the store again.
    """
    kept = getattr(server, "gateway_instance_store_keeping", None)
    if kept is None:
        kept = server.gateway_instance_store_keeping = (threading.Event(), threading.Lock())
    return kept


def _spawn_instance_store(path, log):
    """The store process on socket ``path``, answering once this returns (or 10 s on)."""
    if os.path.exists(path):
        os.unlink(path)
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.storeprocess", path, str(os.getpid())],
        cwd=HERE,
        start_new_session=True,  # a terminal's Ctrl-C is the master's to handle
    )
    try:  # for on_exit's stop; without it the store still leaves with this master
        with open(os.path.join(os.path.dirname(path), INSTANCE_STORE_PID), "w") as fh:
            fh.write(f"{process.pid} {_started(process.pid)}")
    except OSError as exc:  # a full /tmp: the keeper must know this store, not start more
        log.error("instance store: its pid file was not written (%s)", exc)
    deadline = time.monotonic() + 10.0
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return process.pid, _started(process.pid)


def _instance_store_runs(pid, started):
    """True while the store process ``pid`` (started then) runs, and is no zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] != b"Z" and stat[1] == started


def _unsafe_directory(found, uid):
    """Why a directory found at the store's path must not be used (None: it may).

    /tmp is every user's: a name freed by a cleaner may be taken by anyone, and a link
    or a directory others may enter could hand the workers someone else's socket."""
    if not stat.S_ISDIR(found.st_mode):
        return "is not a directory (a link?)"
    if found.st_uid != uid:
        return f"belongs to uid {found.st_uid}"
    if found.st_mode & 0o077:
        return f"has mode {found.st_mode & 0o777:o}: others may enter it"
    return None


def _claim_directory(directory):
    """Make the store's directory again if it is gone; None once it is this user's
    alone, else why not. In sticky /tmp, a directory this user owns can be neither
    removed nor replaced by another (the link itself is checked, never followed)."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass  # the store's own, or someone else's: the check tells
    except OSError as exc:
        return f"cannot be made ({exc})"
    try:
        return _unsafe_directory(os.lstat(directory), os.geteuid())
    except OSError as exc:  # removed again meanwhile: next round
        return f"cannot be looked at ({exc})"


def _keep_instance_store(server, path, pid, started):
    """Start the store again whenever it, its socket or its directory is gone, at the
    same path (the workers were forked with it), until on_exit stops it."""
    complained_at = -INSTANCE_STORE_COMPLAIN_EVERY
    stopping, lock = _keeping(server)
    while not stopping.wait(INSTANCE_STORE_CHECK_EVERY):
        with lock:
            if stopping.is_set():
                return
            runs = _instance_store_runs(pid, started)
            if runs and os.path.exists(path):
                continue
            unsafe = _claim_directory(os.path.dirname(path))
            if unsafe is not None:
                if time.monotonic() - complained_at >= INSTANCE_STORE_COMPLAIN_EVERY:
                    server.log.error(
                        "instance store: its directory %s %s; not using it, trying again "
                        "every %s s (limits fail open in workers that cannot reach the store)",
                        os.path.dirname(path),
                        unsafe,
                        INSTANCE_STORE_CHECK_EVERY,
                    )
                    complained_at = time.monotonic()
                continue
            if runs:  # listening on a name nobody can reach any more
                server.log.warning(
                    "instance store: its socket %s is gone (a /tmp cleaner?): starting it again",
                    path,
                )
                os.kill(pid, signal.SIGTERM)
            else:
                server.log.warning("instance store (pid %s) is gone: starting it again", pid)
            try:
                pid, started = _spawn_instance_store(path, server.log)
            except OSError as exc:  # no descriptor or process to be had now: next round
                server.log.error("instance store: cannot start it (%s); trying again", exc)


def _start_instance_store(server):
    """Without Redis and with more than one worker: the instance store, and its keeper."""
    if SETTINGS.get("REDIS_URL") or workers < 2 or _env("INSTANCE_STORE") == "off":
        return
    directory = tempfile.mkdtemp(prefix=INSTANCE_STORE_DIR_PREFIX)  # this user's only
    path = os.path.join(directory, "store.sock")
    os.environ["GATEWAY_INSTANCE_STORE"] = path  # the workers forked from now on
    pid, started = _spawn_instance_store(path, server.log)
    _keeping(server)  # made here, before the keeper or a stop can look for it
    threading.Thread(
        target=_keep_instance_store,
        args=(server, path, pid, started),
        name="instance-store",
        daemon=True,
    ).start()


def _stop_instance_store(server):
    """Stop this master's instance store: its keeper first, so that none starts again."""
    stopping, lock = _keeping(server)
    with lock:  # after a round the keeper is in, before its next
        stopping.set()
    path = os.environ.get("GATEWAY_INSTANCE_STORE")
    if not path or not os.path.basename(os.path.dirname(path)).startswith(
        INSTANCE_STORE_DIR_PREFIX
    ):
        return
    directory = os.path.dirname(path)
    try:
        with open(os.path.join(directory, INSTANCE_STORE_PID)) as fh:
            pid, started = (int(field) for field in fh.read().split())
    except (OSError, ValueError):
        pid = started = None
    shutil.rmtree(directory, ignore_errors=True)
    if pid is not None and _instance_store_runs(pid, started):
        os.kill(pid, signal.SIGTERM)


def child_exit(server, worker):
    """A worker is gone: its in-flight gauges leave the metrics (its counters stay).

    What prometheus_client's ``mark_process_dead`` does, without importing it (or the
    gateway) into the master, whose imports every later worker inherits.
    """
    pattern = f"gauge_live*_{worker.pid}.db"
    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], pattern)):
        os.remove(path)


def on_exit(server):
    """Stop the instance store; remove the metrics directory this instance made (not
    one a new master, started by USR2, has taken over)."""
    _stop_instance_store(server)
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if not os.path.basename(path).startswith(METRICS_DIR_PREFIX):
        return
    owner = _owner(path)
    if owner is None or owner[0] == os.getpid():
        shutil.rmtree(path, ignore_errors=True)
