"""gunicorn settings for the gateway: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Environment: PORT, HOST, GATEWAY_WORKERS, GATEWAY_WORKER_CONNECTIONS,
GATEWAY_GRACEFUL_TIMEOUT (in-flight calls and drains get this long after SIGTERM),
GATEWAY_WORKER_TIMEOUT (heartbeat watchdog), GATEWAY_MAX_REQUESTS (0: never recycle),
GATEWAY_ACCESS_LOG, GATEWAY_LOG_LEVEL, GATEWAY_LOG_BACKLOG; their defaults, and what
every setting may be (checked here first), are in gateway/config.py, read here as a file.
Nothing from the gateway is imported here, at module level or in a hook: this file runs
in the master, before gevent patches threading (see gateway/db.py), and the master's
imports are inherited by every worker it forks. The instance store's keeper
(gateway/storekeeper.py, the standard library only) is read as a file as well. What
else the master needs of the gateway comes through the classes gunicorn imports: the
logger (gateway/accesslog.py, which imports no peewee; ``on_starting`` asks it to stop
waiting for slow log readers) and the worker. Finishing calls and records at exit is
the worker class's job (gateway/worker.py).
"""

import glob
import os
import runpy
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = runpy.run_path(os.path.join(HERE, "gateway", "config.py"))
STORE_KEEPER = runpy.run_path(os.path.join(HERE, "gateway", "storekeeper.py"))
_started = STORE_KEEPER["process_started"]  # a process's start, from /proc
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
# in-flight slots and request-id claims through one store process of this instance,
# which the master starts, keeps and stops (gateway/storekeeper.py, read as a file).
def _start_instance_store(server):
    """Without Redis and with more than one worker: the instance store, and its keeper."""
    if SETTINGS.get("REDIS_URL") or workers < 2 or _env("INSTANCE_STORE") == "off":
        return
    STORE_KEEPER["start"](server)


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
    STORE_KEEPER["stop"](server)
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if not os.path.basename(path).startswith(METRICS_DIR_PREFIX):
        return
    owner = _owner(path)
    if owner is None or owner[0] == os.getpid():
        shutil.rmtree(path, ignore_errors=True)
