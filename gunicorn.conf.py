"""gunicorn settings for the gateway: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Environment: PORT, HOST, GATEWAY_WORKERS, GATEWAY_WORKER_CONNECTIONS,
GATEWAY_GRACEFUL_TIMEOUT (in-flight calls and drains get this long after SIGTERM),
GATEWAY_WORKER_TIMEOUT (heartbeat watchdog), GATEWAY_MAX_REQUESTS (0: never recycle),
GATEWAY_ACCESS_LOG, GATEWAY_LOG_LEVEL; their defaults are in gateway/config.py, read
here as a file. Nothing from the gateway is imported here, at module level or in a hook:
this file runs in the master, before gevent patches threading (see gateway/db.py), and
the master's imports are inherited by every worker it forks. Finishing calls and records
at exit is the worker class's job (gateway/worker.py).
"""

import glob
import os
import runpy
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = runpy.run_path(os.path.join(HERE, "gateway", "config.py"))["DEFAULTS"]


def _env(name: str, prefix: str = "GATEWAY_") -> str:
    return str(os.environ.get(prefix + name, DEFAULTS[name]))


bind = f"{_env('HOST', '')}:{_env('PORT', '')}"
workers = int(_env("WORKERS"))
worker_class = "gateway.worker.GatewayWorker"
worker_connections = int(_env("WORKER_CONNECTIONS"))
graceful_timeout = int(_env("GRACEFUL_TIMEOUT"))
timeout = int(_env("WORKER_TIMEOUT"))  # heartbeat watchdog; kept beating while draining
keepalive = 75  # longer than typical load balancer idle timeouts
max_requests = int(_env("MAX_REQUESTS"))
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


def on_starting(server):
    """Migrate and make sure there is an admin secret, in a separate process."""
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(metrics_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(metrics_dir, "*.db")):
        os.remove(stale)  # a previous run's metrics
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


def child_exit(server, worker):
    """A worker is gone: its in-flight gauges leave the metrics (its counters stay).

    What prometheus_client's ``mark_process_dead`` does, without importing it (or the
    gateway) into the master, whose imports every later worker inherits.
    """
    pattern = f"gauge_live*_{worker.pid}.db"
    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], pattern)):
        os.remove(path)


def on_exit(server):
    """Remove the metrics directory this instance made."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if os.path.basename(path).startswith(METRICS_DIR_PREFIX):
        shutil.rmtree(path, ignore_errors=True)
