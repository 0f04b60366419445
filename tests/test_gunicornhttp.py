"""gunicornhttp: responses whose headers go out with the first body bytes, in one send,
and the stand-ins for gunicorn's per-request work, which must answer as gunicorn's own would."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pytest
from gunicorn.config import Config
from gunicorn.http import message, wsgi

from gateway import gunicornhttp
from gateway.gunicornhttp import OneSend


class Wire:
    """A socket that keeps each write apart (``sendall``, or ``send`` taking it all)."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    def send(self, data: bytes) -> int:
        self.sends.append(bytes(data))
        return len(data)


def response(method: str = "POST") -> tuple[OneSend, Wire]:
    req = SimpleNamespace(version=(1, 1), method=method, should_close=lambda: False)
    wire = Wire()
    return OneSend(req, wire, Config()), wire


def test_a_json_answer_is_one_send() -> None:
    resp, wire = response()
    resp.start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
    resp.write(b"{}")
    resp.close()
    assert len(wire.sends) == 1
    head, body = wire.sends[0].split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 2" in head
    assert body == b"{}"


def test_a_stream_sends_its_headers_with_the_first_chunk_then_each_chunk() -> None:
    resp, wire = response()
    resp.start_response("200 OK", [("Content-Type", "text/event-stream")])
    resp.write(b"data: 1\n\n")
    resp.write(b"data: 2\n\n")
    resp.close()
    assert len(wire.sends) == 3
    assert wire.sends[0].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")
    assert b"Transfer-Encoding: chunked" in wire.sends[0]
    assert wire.sends[1:] == [b"9\r\ndata: 2\n\n\r\n", b"0\r\n\r\n"]


@pytest.mark.parametrize("method", ["POST", "HEAD"])
def test_headers_with_no_body_to_carry_them_still_go(method: str) -> None:
    resp, wire = response(method)
    resp.start_response("200 OK", [("Content-Type", "text/event-stream")])
    resp.write(b"" if method == "POST" else b"dropped")  # an empty chunk; a HEAD's body
    assert len(wire.sends) == 1 and wire.sends[0].endswith(b"\r\n\r\n")
    assert b"dropped" not in wire.sends[0]


def test_a_response_closed_unwritten_sends_its_headers() -> None:
    resp, wire = response()
    resp.start_response("204 No Content", [])
    resp.close()
    assert len(wire.sends) == 1 and wire.sends[0].startswith(b"HTTP/1.1 204 No Content\r\n")


def test_the_date_header_is_the_current_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """One string per second, the very one gunicorn would have made."""
    import email.utils

    monkeypatch.setattr(gunicornhttp, "_dated", (0, ""))
    for now in (1_700_000_000.2, 1_700_000_000.9, 1_700_000_001.0, 1_700_003_600.5):
        monkeypatch.setattr(gunicornhttp.time, "time", lambda now=now: now)
        assert gunicornhttp._http_date() == email.utils.formatdate(now, usegmt=True)
    assert gunicornhttp._http_date(86400.0) == "Fri, 02 Jan 1970 00:00:00 GMT"


def test_a_workers_settings_read_as_gunicorns_and_each_only_once() -> None:
    from gateway.gunicornhttp import SettledConfig

    cfg = Config()
    cfg.set("keepalive", 7)
    cfg.set("certfile", __file__)
    settled = SettledConfig(cfg)
    for name in [*cfg.settings, "is_ssl", "env", "sendfile", "worker_class_str"]:
        assert getattr(settled, name) == getattr(cfg, name), name
    assert settled.is_ssl and settled.keepalive == 7
    cfg.set("keepalive", 9)  # a worker's settings never change: this one was read
    assert settled.keepalive == 7
    with pytest.raises(AttributeError):
        settled.no_such_setting  # noqa: B018


def test_gunicorns_c_parser_is_used_whenever_it_is_installed() -> None:
    """requirements-fast.txt: nothing in the worker's settings keeps gunicorn from it."""
    import importlib.util

    from gunicorn.http.message import _check_fast_parser

    from gateway.gunicornhttp import SettledConfig

    installed = importlib.util.find_spec("gunicorn_h1c") is not None
    assert _check_fast_parser(SettledConfig(Config())) is installed


class Peer(message.HeaderPolicy):
    def __init__(self, cfg: Config, peer_addr: object) -> None:
        self.cfg, self.peer_addr = cfg, peer_addr


def test_a_peer_is_trusted_for_forwarded_headers_as_gunicorn_says_every_time() -> None:
    cfg = Config()
    cfg.set("forwarded_allow_ips", "127.0.0.1,10.0.0.0/8,::1")
    gunicornhttp._trusted_peers.clear()
    peers = [("127.0.0.1", 1), ("10.2.3.4", 2), ("192.0.2.7", 3), ("::1", 4), ("2001:db8::1", 5)]
    peers += [b"/run/gateway.sock", "unix"]  # not an address: gunicorn trusts a UNIX socket
    for _ in range(2):  # the second round answers from what the first kept
        for addr in peers:
            stock = gunicornhttp._gunicorn_peer_trusted(Peer(cfg, addr))
            assert gunicornhttp._peer_is_trusted_proxy(Peer(cfg, addr)) is stock, addr
    assert dict(gunicornhttp._trusted_peers) == {
        "127.0.0.1": True, "10.2.3.4": True, "192.0.2.7": False, "::1": True, "2001:db8::1": False
    }  # fmt: skip


def test_the_kept_answers_are_bounded() -> None:
    cfg = Config()
    gunicornhttp._trusted_peers.clear()
    for i in range(5000):
        gunicornhttp._peer_is_trusted_proxy(Peer(cfg, (f"10.{i // 256}.{i % 256}.1", 1)))
    assert len(gunicornhttp._trusted_peers) == 4096
    assert gunicornhttp._peer_is_trusted_proxy(Peer(cfg, ("10.19.135.1", 1))) is False  # asked anew


def test_each_request_gets_its_own_environ_whose_errors_follow_a_reopened_log() -> None:
    cfg = Config()
    cfg.set("errorlog", "gunicorn.log")  # not "-": then gunicorn skips the first handler
    base = gunicornhttp._Environ()
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
