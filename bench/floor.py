"""The floor: the least a Python gevent proxy can do, to measure the gateway against.

Forwards the client's body to the upstream with one urllib3 pool and returns its answer;
a stream is relayed chunk by chunk. No framework, no features (no auth, no parsing, no
record). Run: ``python bench/floor.py --upstream http://127.0.0.1:8000 [--port N]``;
it prints ``PORT <n> PIDS <pid>...`` once it listens. ``--processes N`` forks N - 1
more processes serving the same socket, as gunicorn's workers share theirs.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402
import urllib3  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402


def proxy(upstream: str):  # type: ignore[no-untyped-def]
    """The WSGI app forwarding to ``upstream``."""
    pool = urllib3.PoolManager(maxsize=200, retries=False, timeout=urllib3.Timeout(10, 120))

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        body = environ["wsgi.input"].read()
        resp = pool.request(
            "POST",
            upstream + environ["PATH_INFO"],
            body=body,
            preload_content=False,
            headers={"Content-Type": "application/json", "Accept-Encoding": "identity"},
        )
        ctype = resp.headers.get("Content-Type", "application/json")
        if not ctype.startswith("text/event-stream"):
            data = resp.read()
            resp.release_conn()
            start_response(
                f"{resp.status} {resp.reason}",
                [("Content-Type", ctype), ("Content-Length", str(len(data)))],
            )
            return [data]
        start_response(f"{resp.status} {resp.reason}", [("Content-Type", ctype)])
        return relay(resp)

    return app


def relay(resp):  # type: ignore[no-untyped-def]
    """Each chunk as it arrives; a client that leaves closes the upstream."""
    try:
        while chunk := resp.read1(65536):
            yield chunk
    finally:
        resp.close()
        resp.release_conn()


class NoDelayHandler(WSGIHandler):
    """pywsgi sends headers and body apart: without TCP_NODELAY, Nagle waits 40 ms."""

    def __init__(self, sock, address, server, rfile=None):  # type: ignore[no-untyped-def]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, address, server, rfile)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    server = WSGIServer(
        ("127.0.0.1", args.port),
        proxy(args.upstream.rstrip("/")),
        log=None,
        handler_class=NoDelayHandler,
        backlog=2048,
    )
    server.init_socket()
    pids = [os.getpid()]
    for _ in range(args.processes - 1):
        child = gevent.fork()  # the listening socket is shared; gevent's hub is renewed
        if child == 0:
            pids = []
            break
        pids.append(child)
    if pids:
        print(f"PORT {server.server_port} PIDS {' '.join(map(str, pids))}", flush=True)
    server.serve_forever()
