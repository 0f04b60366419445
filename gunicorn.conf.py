"""gunicorn settings for the gateway: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Environment: PORT (8080), HOST (0.0.0.0), GATEWAY_WORKERS (2), GATEWAY_GRACEFUL_TIMEOUT
(30 s: in-flight calls and drains get this long after SIGTERM), GATEWAY_MAX_REQUESTS
(0 = never recycle workers), GATEWAY_WORKER_TIMEOUT (30 s heartbeat watchdog). Nothing from the gateway is imported here at module level:
this file runs in the master, before gevent patches threading (see gateway/db.py).
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8080')}"
workers = int(os.environ.get("GATEWAY_WORKERS", "2"))
worker_class = "gateway.worker.GatewayWorker"
worker_connections = int(os.environ.get("GATEWAY_WORKER_CONNECTIONS", "2000"))
graceful_timeout = int(os.environ.get("GATEWAY_GRACEFUL_TIMEOUT", "30"))
timeout = int(
    os.environ.get("GATEWAY_WORKER_TIMEOUT", "30")
)  # heartbeat watchdog; kept beating while draining
keepalive = 75  # longer than typical load balancer idle timeouts
max_requests = int(os.environ.get("GATEWAY_MAX_REQUESTS", "0"))
max_requests_jitter = max_requests // 10
preload_app = False  # peewee must be imported after the worker patches threading
control_socket_disable = True  # several instances per user must not share one
accesslog = os.environ.get("GATEWAY_ACCESS_LOG", "-") or None
errorlog = "-"
loglevel = os.environ.get("GATEWAY_LOG_LEVEL", "info").lower()

# Every worker writes its Prometheus values to files in one directory per instance,
# which must be named before a worker imports prometheus_client (gateway/metrics.py).
METRICS_DIR_PREFIX = "gateway-metrics-"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)


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
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )


def worker_exit(server, worker):
    """Whatever way the worker ends, nothing it was handling is left pending."""
    from gateway.recorder import recorder
    from gateway.relay import relay

    if relay.active:
        relay.stop_all()
        relay.wait(timeout=2.0)
    recorder.drain(timeout=2.0)


def child_exit(server, worker):
    """A worker is gone: its in-flight gauges leave the metrics (its counters stay)."""
    from gateway.metrics import worker_exited

    worker_exited(worker.pid)


def on_exit(server):
    """Remove the metrics directory this instance made."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if os.path.basename(path).startswith(METRICS_DIR_PREFIX):
        shutil.rmtree(path, ignore_errors=True)
