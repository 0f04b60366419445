"""The gevent worker's stand-ins for gunicorn's per-request work (issue 11): they must
answer as gunicorn's own would, request after request."""

from __future__ import annotations

import io
import logging

from gunicorn.config import Config
from gunicorn.http import message, wsgi

from gateway import worker


class Peer(message.HeaderPolicy):
    def __init__(self, cfg: Config, peer_addr: object) -> None:
        self.cfg, self.peer_addr = cfg, peer_addr


def test_a_peer_is_trusted_for_forwarded_headers_as_gunicorn_says_every_time() -> None:
    cfg = Config()
    cfg.set("forwarded_allow_ips", "127.0.0.1,10.0.0.0/8,::1")
    worker._trusted_peers.clear()
    peers = [("127.0.0.1", 1), ("10.2.3.4", 2), ("192.0.2.7", 3), ("::1", 4), ("2001:db8::1", 5)]
    peers += [b"/run/gateway.sock", "unix"]  # not an address: gunicorn trusts a UNIX socket
    for _ in range(2):  # the second round answers from what the first kept
        for addr in peers:
            stock = worker._gunicorn_peer_trusted(Peer(cfg, addr))
            assert worker._peer_is_trusted_proxy(Peer(cfg, addr)) is stock, addr
    assert dict(worker._trusted_peers) == {
        "127.0.0.1": True, "10.2.3.4": True, "192.0.2.7": False, "::1": True, "2001:db8::1": False
    }  # fmt: skip


def test_the_kept_answers_are_bounded() -> None:
    cfg = Config()
    worker._trusted_peers.clear()
    for i in range(5000):
        worker._peer_is_trusted_proxy(Peer(cfg, (f"10.{i // 256}.{i % 256}.1", 1)))
    assert len(worker._trusted_peers) == 4096
    assert worker._peer_is_trusted_proxy(Peer(cfg, ("10.19.135.1", 1))) is False  # asked anew


def test_each_request_gets_its_own_environ_whose_errors_follow_a_reopened_log() -> None:
    cfg = Config()
    cfg.set("errorlog", "gunicorn.log")  # not "-": then gunicorn skips the first handler
    base = worker._Environ()
    first = base(cfg)
    assert first.keys() == wsgi.base_environ(cfg).keys()
    first["wsgi.input"] = "mine"
    second = base(cfg)
    assert "wsgi.input" not in second and second is not first
    errorlog = logging.getLogger("gunicorn.error")
    for _ in range(2):  # a log reopened between two writes: the new stream gets the second
        handler = logging.StreamHandler(io.StringIO())
        errorlog.addHandler(handler)
        try:
            second["wsgi.errors"].write("oops\n")
        finally:
            errorlog.removeHandler(handler)
        assert handler.stream.getvalue() == "oops\n"
