"""Copies of the migrated PostgreSQL template, made ahead of the tests that take them.

A test's own database is a ``CREATE DATABASE ... TEMPLATE`` copy, dropped afterwards:
about 0.3 s and 0.05-0.5 s of server time, which every PostgreSQL test used to wait for
in its setup and teardown. Here a process of its own makes the copies ahead and drops
them behind, while the tests run: a test takes a copy that is ready and hands it back.

The process (``python tests/pg_spares.py ADMIN_URL TEMPLATE COUNT``) keeps COUNT copies
ready, two made at a time, and names each on stdout once it is made. On stdin it reads
``took`` (a copy was taken: make another) and ``drop NAME`` (a test is done with it:
dropped ``WITH (FORCE)`` on a connection of its own, so that a slow drop never holds
up a copy). At the end of its input (the tests ended, or died) it drops every copy it
made that is left, and exits.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import uuid

import psycopg

MAKERS = 2  # copies made at once: the server copies faster two at a time than one


class Spares:
    """The test process's end: ``take()`` a fresh copy, ``give_back(name)`` when done."""

    def __init__(self, admin_url: str, template: str, count: int = 3) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, admin_url, template, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def take(self) -> str:
        """The name of a migrated database no test has used (waits until one is made)."""
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(f"pg_spares stopped (exit {self.proc.poll()}): {line!r}")
        self._say("took")
        return line.split()[1]

    def give_back(self, name: str) -> None:
        """This test is done with ``name``: it is dropped, out of the test's time."""
        self._say(f"drop {name}")

    def _say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """Drop every copy left and wait for that (before the template may be dropped)."""
        self.proc.stdin.close()
        if self.proc.wait(timeout=300) != 0:
            raise RuntimeError(f"pg_spares exited with {self.proc.returncode}")


def main(admin_url: str, template: str, count: int) -> None:
    made: set[str] = set()  # made and not dropped yet, taken or not
    room = threading.Semaphore(count)  # a copy to make for each release: one per "took"
    stopping = threading.Event()
    done: queue.Queue[str | None] = queue.Queue()  # handed back, to drop

    said = threading.Lock()  # one line at a time on stdout

    def say(line: str) -> None:
        with said:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def maker() -> None:
        try:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                while room.acquire() and not stopping.is_set():
                    name = f"gw_t_{uuid.uuid4().hex[:12]}"
                    admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                    made.add(name)
                    say(f"ready {name}")
        except Exception as exc:  # the test waiting for a copy fails with this
            say(f"failed {exc!r}".replace("\n", " "))

    def dropper() -> None:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            while (name := done.get()) is not None:
                try:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                except psycopg.Error as exc:  # left behind, as a killed run leaves them
                    print(f"pg_spares: could not drop {name}: {exc}", file=sys.stderr)
                made.discard(name)

    threads = [threading.Thread(target=maker, daemon=True) for _ in range(MAKERS)]
    threads.append(threading.Thread(target=dropper, daemon=True))
    for thread in threads:
        thread.start()
    try:
        for line in sys.stdin:
            word, _, name = line.strip().partition(" ")
            if word == "took":
                room.release()
            elif word == "drop":
                done.put(name)
    finally:
        stopping.set()
        room.release(MAKERS)  # wake the makers to see it
        for thread in threads[:-1]:
            thread.join()
        for name in list(made):  # left untaken, or handed back and not yet dropped
            done.put(name)
        done.put(None)
        threads[-1].join()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
