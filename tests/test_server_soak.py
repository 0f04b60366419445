"""Soak: hundreds of concurrent streams on one gateway worker, half of them hung up.

Every client is a raw socket, so the moment and the kind of each hang-up are exact
(``time.monotonic()`` is one clock for every process of the machine, the fake
upstream's too). Half the streams read to the end (some of them half-close first,
which is not a hang-up); the rest hang up with a FIN or a reset at a random event,
before the first byte, during an upstream stall, or with a FIN just before the
terminal event. Afterwards every stream has exactly one record, with the status its
client earned (aborted exactly when it left before the terminal event), the fake
upstream's own token counts, an upstream response read to its end, and nothing is
left pending. The worker's peak RSS is printed.

``GATEWAY_SOAK_STREAMS=N`` sets the number of streams (default 400, under a minute
per database); ``pytest -s`` shows the figures.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gevent
import gevent.pool
import pytest
import requests

from tests.servers import FakeUpstream, Gateway, wait_until

pytestmark = pytest.mark.server

STREAMS = int(os.environ.get("GATEWAY_SOAK_STREAMS", "400"))
SEED = 7
PROMPT = [{"role": "user", "content": "tell me a story"}]
# What a client does: reads to the end (a half-closing one too), or hangs up after
# some events, before the first byte, during a stall, or just before the terminal event.
READ, HALF, AFTER, EARLY, STALL, LATE = "read", "half", "after", "early", "stall", "late"
MIX = [READ] * 8 + [HALF] * 2 + [AFTER] * 5 + [EARLY] * 2 + [STALL] * 2 + [LATE]
END_DELAY = 0.5  # silence before every terminal event: hang-ups are clearly before it
LATE_END_DELAY = 0.2  # ... but the late ones leave just before it
# A FIN this close to the terminal event may be seen after it: either status is right.
MARGIN = 0.05
READ_TO_END = "client disconnected; the upstream was read to its end"


@dataclass
class Client:
    """One stream's plan, and what its client saw."""

    sid: str
    kind: str
    chunks: int
    reset: bool = False  # hang up with an RST rather than a FIN
    close_after: int | None = None  # data events read before hanging up
    wait: float = 0.0  # seconds before hanging up (early, stall)
    left_at: float | None = None  # time.monotonic() of the hang-up
    got_terminal: bool = False
    received: bytes = b""
    error: str | None = None

    @property
    def script(self) -> str:
        knobs = f"id={self.sid};chunks={self.chunks};delay=0.03;end_delay={END_DELAY}"
        if self.kind == LATE:
            knobs = knobs.replace(f"end_delay={END_DELAY}", f"end_delay={LATE_END_DELAY}")
        elif self.kind == EARLY:
            knobs += ";header_delay=0.4"
        elif self.kind == STALL:
            knobs += f";stall_at={self.close_after};stall_for=0.6"
        return knobs


def plan(count: int, rng: random.Random) -> list[Client]:
    """``count`` clients in a shuffled mix of every kind."""
    clients = []
    for i in range(count):
        kind = MIX[i % len(MIX)]
        chunks = rng.randint(3, 10)
        reset = rng.random() < 0.5 and kind in (AFTER, EARLY, STALL)
        client = Client(f"soak{i}", kind, chunks, reset)
        # A chat stream's data events: the role, the pieces, the finish chunk with [DONE].
        if kind == AFTER:
            client.close_after = rng.randint(1, chunks + 3)
        elif kind == LATE:
            client.close_after = chunks + 1
        elif kind == STALL:
            client.close_after, client.wait = rng.randint(1, chunks), rng.uniform(0.05, 0.4)
        elif kind == EARLY:
            client.wait = rng.uniform(0.0, 0.3)
        clients.append(client)
    rng.shuffle(clients)
    return clients


def request(key: str, client: Client) -> bytes:
    body = json.dumps({"model": "fake", "messages": PROMPT, "stream": True}).encode()
    return (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nX-Fake-Script: {client.script}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def run(port: int, key: str, client: Client) -> None:
    """Play one client's part."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(request(key, client))
        if client.kind == HALF:
            sock.shutdown(socket.SHUT_WR)  # done sending; still reading
        if client.kind == EARLY:
            gevent.sleep(client.wait)
            return _hang_up(sock, client)
        sock.settimeout(60)
        while True:
            data = sock.recv(65536)
            if not data:
                client.error = "connection closed by the gateway"
                return
            client.received += data
            if client.close_after and client.received.count(b"data: ") >= client.close_after:
                gevent.sleep(client.wait)
                return _hang_up(sock, client)
            # The chunked body's end (the headers' end may look alike: a header value
            # ending in 0, such as X-RateLimit-Remaining-TPM: 1000000000).
            if client.received.partition(b"\r\n\r\n")[2].endswith(b"0\r\n\r\n"):
                client.got_terminal = b"data: [DONE]" in client.received
                return
    except OSError as exc:
        client.error = repr(exc)
    finally:
        sock.close()


def _hang_up(sock: socket.socket, client: Client) -> None:
    # Whatever has arrived is read first: what it holds decides the expected status,
    # and unread bytes would turn a FIN into a reset.
    sock.settimeout(0)
    try:
        while data := sock.recv(65536):
            client.received += data
    except BlockingIOError:
        pass
    client.got_terminal = b"data: [DONE]" in client.received
    if client.reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.left_at = time.monotonic()
    sock.close()


def expected(client: Client, sent: dict) -> str | None:
    """The status the client earned; None when it left too close to the terminal event."""
    if client.left_at is None or client.got_terminal:
        return "completed"
    if sent["terminal_at"] - client.left_at < MARGIN:
        return None
    return "aborted"


def peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def test_soak(gateway_factory, fake) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = gateway_factory(
        GATEWAY_MAX_DRAINS=str(STREAMS),  # every hang-up drains: the upstream is read to its end
        GATEWAY_WORKER_CONNECTIONS=str(STREAMS + 100),
    )
    # Limits no soak reaches: hundreds of streams at once from one key.
    route = gw.setup_route(fake.url, remote_id="fake", key={"rpmLimit": 10**9, "tpmLimit": 10**9})
    (worker,) = gw.worker_pids()
    idle_kb = peak_rss_kb(worker)
    clients = plan(STREAMS, random.Random(SEED))

    started = time.monotonic()
    pool = gevent.pool.Pool(STREAMS)
    for client in clients:
        pool.spawn(run, gw.port, route["key"], client)
    pool.join()
    streamed = time.monotonic() - started
    rows, log = wait_until(lambda: _final(gw, fake), timeout=60 + STREAMS / 20, interval=0.2)
    settled = time.monotonic() - started
    peak_kb = peak_rss_kb(worker)

    assert [c.error for c in clients if c.error] == []
    by_client = Counter(_sid(row) for row in rows)
    assert set(by_client) == set(log) and set(by_client.values()) == {1}, "one record per call"
    # A client that hung up before the gateway read its request made no call: only an
    # early one, and only when the connections came faster than they were accepted.
    unread = [c for c in clients if c.sid not in log]
    assert all(c.kind == EARLY for c in unread) and len(unread) < STREAMS / 100, unread
    ambiguous = []
    wrong = []
    by_sid = {c.sid: c for c in clients}
    late = [c for c in clients if c.kind == LATE and c.sid in log]
    decided = [c for c in late if expected(c, log[c.sid]) == "aborted"]
    for row in rows:
        client = by_sid[_sid(row)]
        sent = log[client.sid]
        assert sent["outcome"] == "complete", (client, sent)
        assert (row["promptTokens"], row["completionTokens"]) == (
            sent["usage"]["input_tokens"],
            sent["usage"]["output_tokens"],
        )
        assert row["completion"][0]["content"] == "".join(f"tok{i} " for i in range(client.chunks))
        want = expected(client, sent)
        if want is None:
            ambiguous.append(client.sid)
        elif row["status"] != want:
            wrong.append((client.kind, client.reset, row["status"], want, row["error"]))
        assert row["error"] == (None if row["status"] == "completed" else READ_TO_END)
        if client.kind in (READ, HALF):
            assert client.got_terminal and b"tok%d " % (client.chunks - 1) in client.received
    kinds = Counter(c.kind + (" rst" if c.reset else "") for c in clients)
    mix = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    print(
        f"\nsoak: {STREAMS} streams ({mix}); streamed in {streamed:.1f} s, all final "
        f"after {settled:.1f} s; worker peak RSS {peak_kb / 1024:.1f} MB "
        f"(idle {idle_kb / 1024:.1f} MB, {(peak_kb - idle_kb) / STREAMS:.1f} KB per stream); "
        f"{len(ambiguous)} hang-ups within {MARGIN * 1000:.0f} ms of the terminal event; "
        f"{len(decided)} of {len(late)} late ones clearly before it; "
        f"{len(unread)} left before their request was read"
    )
    assert wrong == [], "\n".join(map(str, wrong))
    assert len(decided) >= min(5, len(late)), "too few late hang-ups clearly before the end"


def _final(gw: Gateway, fake: FakeUpstream) -> tuple[list[dict], dict[str, dict]] | None:
    """Every record and the fake's log of every call, once no call runs and none is
    pending (the recorder may still be writing once no call runs: ``Gateway.records``
    reads the pages again when a row moved between two)."""
    if requests.get(f"{gw.url}/healthz", timeout=10).json()["calls"]:
        return None
    log = {entry["id"]: entry for entry in fake.log() if (entry["id"] or "").startswith("soak")}
    rows = gw.records()  # every page, read again whole if a row moved between two
    if len(rows) >= len(log) and all(r["status"] != "pending" for r in rows):
        return rows, log
    return None


def _sid(row: dict) -> str:
    script = row["prompt"]["extraHeaders"]["x-fake-script"]
    return script.split(";", 1)[0].removeprefix("id=")
