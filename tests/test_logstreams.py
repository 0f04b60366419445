"""A log line never makes the worker wait for a slow reader of stdout or stderr, and the
reader gets every line it gets whole and in order; the lines it does not get are counted."""

from __future__ import annotations

import logging
import os
import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests
from gevent import monkey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import logstreams
from tests.fuzz_support import FUZZ
from tests.servers import Gateway, wait_until

_native_signal = monkey.get_original("signal", "signal")
_native_thread = monkey.get_original("_thread", "start_new_thread")
_native_lock = monkey.get_original("_thread", "allocate_lock")
_native_ident = monkey.get_original("_thread", "get_ident")
_native_sleep = monkey.get_original("time", "sleep")


class Hung(Exception):
    """Not an OSError: the outlet takes those as the stream's own errors."""


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail, instead of hanging, if the block takes longer: a write that waits for the
    reader blocks the whole process, gevent's timeouts included. A native thread sends
    SIGALRM to this thread (the kernel could give a process's signal to any of its
    threads), which interrupts the write; the handler's error ends it."""
    import signal

    def expired(signum: int, frame: object) -> None:
        raise Hung(f"still writing after {seconds} s: the write waited for the reader")

    def alarm(me: int) -> None:
        if not over.acquire(timeout=seconds):
            signal.pthread_kill(me, signal.SIGALRM)

    over = _native_lock()
    over.acquire()
    before = _native_signal(signal.SIGALRM, expired)
    _native_thread(alarm, (_native_ident(),))
    try:
        yield
    finally:
        over.release()
        _native_signal(signal.SIGALRM, before)


def in_a_worker(*args: object) -> logstreams.Outlet | None:
    """An outlet as a worker has it: its loop writes what waits."""
    return logstreams.outlet(*args, loop=gevent.get_hub().loop)  # type: ignore[arg-type]


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    os.set_blocking(read, False)
    yield read, write
    for fd in (read, write):
        os.close(fd)


def read_all(fd: int, outlet: logstreams.Outlet, timeout: float = 5.0) -> bytes:
    """Read ``fd`` until the outlet has nothing waiting and the pipe is empty."""
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            piece = os.read(fd, 1 << 16)
        except BlockingIOError:
            piece = b""
        got += piece
        if not piece:
            if not outlet.waiting:
                return got
            gevent.sleep(0.001)  # the loop writes what waits
    raise AssertionError(f"{outlet.waiting} bytes still waiting after {timeout} s")


def line(i: int, size: int = 60) -> str:
    return f"line {i:06d} {'x' * size}\n"


def numbers(out: bytes) -> list[int]:
    """The lines' numbers, in the order read; each line must be whole."""
    found = []
    for text in out.decode().splitlines(keepends=True):
        number = int(text.split()[1])
        assert text == line(number, len(text) - len(line(number, 0))), f"torn: {text!r}"
        found.append(number)
    return found


def test_a_line_goes_out_at_once_while_the_reader_keeps_up(pipe) -> None:  # type: ignore[no-untyped-def]
    read, write = pipe
    outlet = in_a_worker(write, "stdout", 4096)
    assert outlet is not None
    outlet.write(line(1))
    assert os.read(read, 1 << 16) == line(1).encode()  # no switch to the loop: written
    assert outlet.waiting == 0 and outlet.dropped == 0


def test_a_full_pipe_costs_the_writer_nothing_and_what_it_kept_arrives_in_order(
    pipe,
) -> None:  # type: ignore[no-untyped-def]
    read, write = pipe
    counted: list[tuple[str, int]] = []
    outlet = in_a_worker(write, "stderr", 1 << 20, lambda name, n: counted.append((name, n)))
    assert outlet is not None
    with within(2.0):  # 200 KB, three times what the pipe holds, nobody reading
        for i in range(3000):
            outlet.write(line(i))
    assert outlet.waiting > 0 and outlet.dropped == 0
    assert numbers(read_all(read, outlet)) == list(range(3000))
    assert counted == []


def test_past_the_backlog_lines_are_dropped_whole_counted_and_reported(pipe, caplog) -> None:  # type: ignore[no-untyped-def]
    read, write = pipe
    counted: list[tuple[str, int]] = []
    outlet = in_a_worker(write, "stdout", 8192, lambda name, n: counted.append((name, n)))
    assert outlet is not None
    with within(2.0):
        for i in range(3000):
            outlet.write(line(i))
    gevent.sleep(0.01)  # the count is given in the loop
    dropped = outlet.dropped
    assert dropped > 0 and sum(n for _, n in counted) == dropped
    assert {name for name, _ in counted} == {"stdout"}
    with caplog.at_level(logging.WARNING, logger="gateway.logstreams"):
        got = numbers(read_all(read, outlet))
        gevent.sleep(0.01)  # the report is a greenlet's
    assert got == sorted(got) and len(got) + dropped == 3000
    assert got[: len(got) // 2] == list(range(len(got) // 2))  # the first lines were kept
    # Its own logger's only: the server-log handler also takes this warning, and its
    # writer's turn may fail on a database an earlier test dropped, and say so.
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.logstreams"] == [
        f"gateway: {dropped} log lines to stdout were dropped: its reader fell 8192 bytes behind"
    ]
    # Room again: lines go out at once, nothing more is dropped.
    outlet.write(line(9999))
    assert os.read(read, 1 << 16) == line(9999).encode()
    assert outlet.dropped == dropped


def test_a_line_longer_than_the_room_goes_out_whole_in_pieces(pipe) -> None:  # type: ignore[no-untyped-def]
    read, write = pipe
    outlet = in_a_worker(write, "stdout", 1 << 20)
    assert outlet is not None
    with within(2.0):
        outlet.write(line(0, 40_000))
        outlet.write(line(1, 200_000))  # more than the pipe holds: taken in part
        outlet.write(line(2))
    assert numbers(read_all(read, outlet)) == [0, 1, 2]


def test_other_threads_write_without_waiting_too(pipe) -> None:  # type: ignore[no-untyped-def]
    """The database's pool threads log too: their lines wait in the same backlog."""
    read, write = pipe
    outlet = in_a_worker(write, "stderr", 1 << 20)
    assert outlet is not None
    done = _native_lock()
    done.acquire()

    def write_from_a_thread() -> None:
        for i in range(2000):
            outlet.write(line(i))
        done.release()

    with within(2.0):
        _native_thread(write_from_a_thread, ())
        assert done.acquire(timeout=1.5), "the thread's writes waited for the reader"
    assert numbers(read_all(read, outlet)) == list(range(2000))


def test_the_shared_description_stays_as_it_was(pipe) -> None:  # type: ignore[no-untyped-def]
    """The master and the other workers write to the same pipe, waiting as before: only
    the outlet's own way into it is non-blocking."""
    _read, write = pipe
    outlet = in_a_worker(write, "stdout", 4096)
    assert outlet is not None
    assert os.get_blocking(write) and not os.get_blocking(outlet._fd)


def test_a_socket_is_written_without_waiting_and_left_blocking_for_the_others() -> None:
    mine, reader = socket.socketpair()  # as systemd's journal gives a service's stdout
    with mine, reader:
        outlet = in_a_worker(mine.fileno(), "stdout", 1 << 22)
        assert outlet is not None
        with within(2.0):
            for i in range(20_000):  # 1.4 MB: more than the socket's buffers hold
                outlet.write(line(i))
        assert outlet.waiting > 0 and mine.getblocking()
        reader.setblocking(False)
        got = b""
        deadline = time.monotonic() + 5
        while (outlet.waiting or got.count(b"\n") < 20_000) and time.monotonic() < deadline:
            try:
                got += reader.recv(1 << 16)
            except BlockingIOError:
                gevent.sleep(0.001)
        assert numbers(got) == list(range(20_000))


def test_a_regular_file_is_left_as_it_is(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as file:
        assert in_a_worker(file.fileno(), "stdout", 4096) is None


def test_at_exit_what_waits_gets_its_time_and_no_more(pipe) -> None:  # type: ignore[no-untyped-def]
    read, write = pipe
    outlet = in_a_worker(write, "stdout", 1 << 20)
    assert outlet is not None
    with within(2.0):
        for i in range(2000):
            outlet.write(line(i))
    waiting = outlet.waiting
    started = time.monotonic()
    assert logstreams.finish([outlet], wait=0.3) is False  # nobody reads
    assert 0.3 <= time.monotonic() - started < 1.0 and outlet.waiting == waiting
    got = b""

    def read_slowly() -> None:
        nonlocal got
        while True:
            try:
                got += os.read(read, 4096)
            except BlockingIOError:
                if not outlet.waiting:
                    return
            _native_sleep(0.002)

    _native_thread(read_slowly, ())
    assert logstreams.finish([outlet], wait=5.0) is True  # no loop needed at exit
    _native_sleep(0.05)
    with suppress(BlockingIOError):
        got += os.read(read, 1 << 16)
    assert numbers(got) == list(range(2000))


def test_without_a_loop_what_waits_goes_out_first_with_the_next_line(pipe) -> None:  # type: ignore[no-untyped-def]
    """gunicorn's master has no loop: what waits goes out, in order, when it next writes,
    and then a line says how many were dropped."""
    read, write = pipe
    outlet = logstreams.outlet(write, "stderr", 8192)
    assert outlet is not None
    with within(2.0):
        for i in range(1500):
            outlet.write(line(i))
    assert outlet.waiting > 0 and outlet.dropped > 0
    got = b""
    while True:  # the reader takes what the pipe holds; nothing more comes by itself
        try:
            got += os.read(read, 1 << 16)
        except BlockingIOError:
            break
    assert outlet.waiting > 0
    outlet.write(line(5000))
    got += os.read(read, 1 << 16)
    note = f"gateway: {outlet.dropped} log lines to stderr were dropped: its reader fell 8192 bytes behind\n"
    assert got.endswith(note.encode() + line(5000).encode())
    kept = numbers(got[: -len(note) - len(line(5000))])
    assert kept == list(range(len(kept))) and len(kept) + outlet.dropped == 1500


def test_a_line_logged_by_a_signal_handler_mid_write_comes_after_it_whole(pipe) -> None:  # type: ignore[no-untyped-def]
    """gunicorn's master logs from its SIGCHLD handler, which may run between the
    system's taking part of a line and the outlet's keeping the rest."""
    read, write = pipe
    own = os.open(f"/proc/self/fd/{write}", os.O_WRONLY | os.O_NONBLOCK)
    interrupted = False

    def send(data: bytes) -> int:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            taken = os.write(own, data[:10])  # the system took part of the line ...
            outlet.write(line(2))  # ... and a signal's handler logged
            return taken
        return os.write(own, data)

    outlet = logstreams.Outlet("stderr", send, own, write, 1 << 20)
    outlet.write(line(1, 200))
    outlet.write(line(3))
    try:
        assert numbers(os.read(read, 1 << 16)) == [1, 2, 3]
    finally:
        os.close(own)


def test_a_forked_child_writes_its_own_lines_not_its_parents(pipe) -> None:  # type: ignore[no-untyped-def]
    """The master forks its workers with lines waiting: a child writing them too would
    double them. ``install`` has each child forget them (the hook registered here)."""
    read, write = pipe
    outlet = logstreams.outlet(write, "stdout", 1 << 20)
    assert outlet is not None
    os.register_at_fork(after_in_child=outlet.forget)
    with within(2.0):
        for i in range(1500):
            outlet.write(line(i))
    assert outlet.waiting > 0
    got = bytearray()
    stop = _native_lock()
    stop.acquire()

    def reader() -> None:
        while not stop.acquire(timeout=0.002):
            with suppress(BlockingIOError):
                got.extend(os.read(read, 1 << 16))
        stop.release()

    child = os.fork()
    if child == 0:  # the child: its own line, then its exit's wait for the reader
        try:
            outlet.write(line(9000))
            logstreams.finish([outlet], 5.0)
        finally:
            os._exit(0)
    _native_thread(reader, ())
    assert os.waitpid(child, 0)[1] == 0
    assert logstreams.finish([outlet], 5.0)
    _native_sleep(0.1)
    stop.release()
    _native_sleep(0.05)
    assert sorted(numbers(bytes(got))) == [*range(1500), 9000]


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 100_000), st.booleans()),
        st.tuples(st.just("read"), st.integers(1, 100_000), st.just(False)),
    ),
    max_size=60,
)


@settings(FUZZ, max_examples=150)
@given(ops=_OPS, backlog=st.integers(0, 300_000))
def test_whatever_the_reader_does_it_gets_whole_lines_in_order_and_the_rest_counted(
    ops: list, backlog: int
) -> None:
    """Lines of any size (non-ASCII too), reads of any size between them, any backlog: the
    reader gets a subsequence of the lines, each whole, in order; every other is counted."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    try:
        outlet = in_a_worker(write, "stdout", backlog)
        assert outlet is not None
        got = b""
        sent: list[str] = []
        with within(5.0):
            for kind, size, wide in ops:
                if kind == "write":
                    text = line(len(sent), size)
                    sent.append(text.replace("x", "é") if wide else text)
                    outlet.write(sent[-1])
                else:
                    with suppress(BlockingIOError):
                        got += os.read(read, size)
                    gevent.sleep(0)  # the loop may write what waits
        got += read_all(read, outlet)
        lines = got.decode().splitlines(keepends=True)
        kept = [int(each.split()[1]) for each in lines]
        assert kept == sorted(set(kept))
        assert lines == [sent[number] for number in kept]  # each whole
        assert len(kept) + outlet.dropped == len(sent)
    finally:
        os.close(read)
        os.close(write)


ACCESS_LINE = re.compile(
    r'\S+ - \S+ \[[^\]]+\] "[A-Z]+ \S+ HTTP/1\.[01]" \d{3} (\d+|-) "[^"]*" "[^"]*"\n'
)
GATEWAY_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[\d+\] \S+: .*\n")
GUNICORN_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[[A-Z]+\] .*\n")
PREPARE_LINE = re.compile(r"gateway: .*\n")  # what ``flask prepare`` says at the start
DROPPED = re.compile(
    r"gateway: (\d+) log lines to stdout were dropped: its reader fell 16384 bytes"
)


class OnAPipe:
    """A real gunicorn (2 workers, SQLite, the access log on) whose stdout and stderr go
    to a pipe the test reads only once it says so: a stalled log driver until then."""

    def __init__(self, tmp_path: Path) -> None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        self.read = read
        self.database = tmp_path / "gateway.db"
        self.gw = Gateway(
            f"sqlite:///{self.database}",
            tmp_path / "instance",
            workers=2,
            output=write,
            GATEWAY_ACCESS_LOG="-",
            GATEWAY_LOG_BACKLOG="16384",
        )
        os.close(write)
        self.got = bytearray()
        self.reading = False
        self._drain = gevent.spawn(self._reader)

    def _reader(self) -> None:
        while True:
            if self.reading:
                try:
                    piece = os.read(self.read, 1 << 16)
                except BlockingIOError:
                    piece = None
                if piece == b"":
                    return  # every writer closed it: the gateway stopped
                if piece:
                    self.got.extend(piece)
                    continue
            gevent.sleep(0.005)

    def calls(self, fake: Any, count: int) -> None:
        """``count`` JSON calls, one at a time, each answered 200 within 5 s."""
        route = self.gw.setup_route(fake.url, key={"rpmLimit": 10**6, "tpmLimit": 10**9})
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {route['key']}"
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(count):
            answer = session.post(f"{self.gw.url}/v1/chat/completions", json=body, timeout=5)
            assert answer.status_code == 200, answer.text

    def close(self) -> list[str]:
        """Stop the gateway (if running), read the rest; the lines read, each whole."""
        self.reading = True
        self.gw.stop()
        self._drain.join(timeout=10)
        self._drain.kill()
        os.close(self.read)
        lines = self.got.decode().splitlines(keepends=True)
        forms = (ACCESS_LINE, GATEWAY_LINE, GUNICORN_LINE, PREPARE_LINE)
        torn = [each for each in lines if not any(form.fullmatch(each) for form in forms)]
        assert not torn, torn[:5]
        return lines


@pytest.mark.server
def test_a_log_reader_that_stopped_reading_stops_no_call(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """stdout and stderr to a pipe nobody reads, as a stalled log driver leaves them, with
    the access log on (the default): a worker used to stop at its first write past the
    pipe's 64 KB, and every call of it with it. Now every call is answered and recorded;
    once the reader reads again, each line it gets is whole, and the lines dropped are
    reported as many as the metric counted."""
    piped = OnAPipe(tmp_path)
    gw = piped.gw
    try:
        piped.calls(fake, CALLS)  # about 190 KB of access log: three pipes' worth
        assert wait_until(lambda: gw.metric("nexusgate_completions_total") == CALLS)
        dropped = gw.metric("gateway_log_lines_dropped_total")
        assert dropped > 0
        piped.reading = True
        reported = wait_until(
            lambda: (
                (found := [int(n) for n in DROPPED.findall(piped.got.decode())])
                and sum(found) == gw.metric("gateway_log_lines_dropped_total")
                and found
            ),
            timeout=10,
        )
        assert sum(reported) >= dropped
    finally:
        lines = piped.close()
    assert sum('"POST /v1/chat/completions HTTP/1.1" 200' in each for each in lines) < CALLS


@pytest.mark.server
def test_a_log_reader_that_stopped_reading_stops_no_shutdown(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The master says "Handling signal: term" before it passes a SIGTERM on: with the
    pipe full it used to wait there, and a container's stop ended in its SIGKILL. Now
    the whole instance stops in seconds, every call recorded, with nobody reading."""
    piped = OnAPipe(tmp_path)
    try:
        piped.calls(fake, 800)  # about 100 KB: the pipe is full
        started = time.monotonic()
        assert piped.gw.stop(timeout=30) == 0
        assert time.monotonic() - started < 15
    finally:
        piped.close()
    with sqlite3.connect(piped.database) as database:
        statuses = database.execute("SELECT status, count(*) FROM completions GROUP BY 1")
        assert dict(statuses.fetchall()) == {"completed": 800}


CALLS = 1500
