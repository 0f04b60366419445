"""gunicorn settings for the gateway: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Environment: PORT (8080), HOST (0.0.0.0), GATEWAY_WORKERS (2), GATEWAY_GRACEFUL_TIMEOUT
(30 s: in-flight calls and drains get this long after SIGTERM), GATEWAY_MAX_REQUESTS
(0 = never recycle workers), GATEWAY_WORKER_TIMEOUT (30 s heartbeat watchdog). Nothing from the gateway is imported here at module level:
this file runs in the master, before gevent patches threading (see gateway/db.py).
"""

import os
import subprocess
import sys

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
logger_class = "gateway.accesslog.RedactingLogger"  # gateway keys cut to their hint
errorlog = "-"
loglevel = os.environ.get("GATEWAY_LOG_LEVEL", "info").lower()


def on_starting(server):
    """Migrate and make sure there is an admin secret, in a separate process."""
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
