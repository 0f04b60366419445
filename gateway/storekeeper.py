"""The instance store's keeper, in gunicorn's master: ``start(server)`` and ``stop(server)``.

Without ``REDIS_URL`` and with more than one worker, the workers share their limits,
in-flight slots and request-id claims through one store process of this instance
(``storeprocess``), whose socket they find in GATEWAY_INSTANCE_STORE (``instancestore``).
This module owns that process's life: it makes the store's directory, starts the store,
and its keeper thread starts it again within ``CHECK_EVERY`` if it dies or its socket or
directory is removed (a /tmp cleaner: systemd-tmpfiles, tmpreaper; the workers fail open
meanwhile, as without Redis); ``stop`` ends both at exit. Killed, the master leaves the
store behind for at most a second: it leaves when its master does.

The directory is ``gateway-store-XXXXXXXX``, this user's alone (several instances per
user do not meet), in $RUNTIME_DIRECTORY when that is this user's and no one else may
make a name in it (systemd makes it for a service with ``RuntimeDirectory=``, and
removes it when the service stops): in /tmp anyone may take the name after a cleaner
removed it, and the workers know no other. Not $XDG_RUNTIME_DIR: a login session's,
which systemd removes at the user's last logout, under a gateway started from that
session and still running. Else, or when the socket's path would not fit a Unix socket
there, it is in the temporary directory. The keeper's checks hold in both.

gunicorn.conf.py loads this file by its path (``runpy.run_path``), as it reads config.py,
and never imports it: the master's imports are inherited by every worker it forks, before
gevent patches threading. So only the standard library is imported here. gunicorn runs
its config file again, as a new module, at every SIGHUP, and this file with it: what a
keeper and a later stop share is kept on the arbiter (``_keeping``), not here.
"""

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR_PREFIX = "gateway-store-"
SOCKET = "store.sock"
PID_FILE = "store.pid"  # the store removes it (storeprocess.PID_FILE)
CHECK_EVERY = 0.5
COMPLAIN_EVERY = 60.0  # seconds between errors about a path not to be had
# A Unix socket's path fits sun_path: 108 bytes on Linux, its NUL one of them.
SOCKET_PATH_MAX = 107
RUNTIME_DIRECTORY = "RUNTIME_DIRECTORY"  # systemd's, for a service with RuntimeDirectory=


def process_stat(pid):
    """Process ``pid``'s state (b"R", b"S", b"Z"...) and start in clock ticks after boot
    (/proc/<pid>/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_started(pid):
    """Process ``pid``'s start in clock ticks after boot, or None."""
    found = process_stat(pid)
    return None if found is None else found[1]


def _keeping(server):
    """``stop``'s word to the keeper, and the lock that makes a keeper's round and the
    stop one after the other (no store is started once the stop has begun).

    Not the directory's absence: a /tmp cleaner removes it too, and a keeper that
    stopped then left the instance's limits open until a restart. Kept on the arbiter:
    gunicorn runs its config file (and so this one) again as a new module at every
    SIGHUP, on_exit then calls the new module's ``stop``, and the keeper started before
    still runs the first one's code; a module's own event was one the stop never set,
    and the keeper made the store again.
    """
    kept = getattr(server, "gateway_instance_store_keeping", None)
    if kept is None:
        kept = server.gateway_instance_store_keeping = (threading.Event(), threading.Lock())
    return kept


def _spawn(path, log):
    """The store process on socket ``path``, answering once this returns (or 10 s on)."""
    if os.path.exists(path):
        os.unlink(path)
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.storeprocess", path, str(os.getpid())],
        cwd=ROOT,
        start_new_session=True,  # a terminal's Ctrl-C is the master's to handle
    )
    try:  # for the stop; without it the store still leaves with this master
        with open(os.path.join(os.path.dirname(path), PID_FILE), "w") as fh:
            fh.write(f"{process.pid} {process_started(process.pid)}")
    except OSError as exc:  # a full /tmp: the keeper must know this store, not start more
        log.error("instance store: its pid file was not written (%s)", exc)
    deadline = time.monotonic() + 10.0
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return process.pid, process_started(process.pid)


def _runs(pid, started):
    """True while the store process ``pid`` (started then) runs, and is no zombie."""
    found = process_stat(pid)
    return found is not None and found[0] != b"Z" and found[1] == started


def _unsafe_directory(found, uid, others=0o077, what="others may enter it"):
    """Why a directory found at the store's path must not be used (None: it may): not a
    directory, not ``uid``'s, or with any of the mode bits ``others`` (``what`` they let
    others do).

    /tmp is every user's: a name freed by a cleaner may be taken by anyone, and a link
    or a directory others may enter could hand the workers someone else's socket."""
    if not stat.S_ISDIR(found.st_mode):
        return "is not a directory (a link?)"
    if found.st_uid != uid:
        return f"belongs to uid {found.st_uid}"
    if found.st_mode & others:
        return f"has mode {found.st_mode & 0o777:o}: {what}"
    return None


def _claim_directory(directory):
    """Make the store's directory again if it is gone; None once it is this user's
    alone, else why not. In sticky /tmp, a directory this user owns can be neither
    removed nor replaced by another (the link itself is checked, never followed)."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass  # the store's own, or someone else's: the check tells
    except OSError as exc:
        return f"cannot be made ({exc})"
    try:
        return _unsafe_directory(os.lstat(directory), os.geteuid())
    except OSError as exc:  # removed again meanwhile: next round
        return f"cannot be looked at ({exc})"


def _keep(server, path, pid, started):
    """Start the store again whenever it, its socket or its directory is gone, at the
    same path (the workers were forked with it), until ``stop``."""
    complained_at = -COMPLAIN_EVERY
    stopping, lock = _keeping(server)
    while not stopping.wait(CHECK_EVERY):
        with lock:
            if stopping.is_set():
                return
            runs = _runs(pid, started)
            if runs and os.path.exists(path):
                continue
            unsafe = _claim_directory(os.path.dirname(path))
            if unsafe is not None:
                if time.monotonic() - complained_at >= COMPLAIN_EVERY:
                    server.log.error(
                        "instance store: its directory %s %s; not using it, trying again "
                        "every %s s (limits fail open in workers that cannot reach the store)",
                        os.path.dirname(path),
                        unsafe,
                        CHECK_EVERY,
                    )
                    complained_at = time.monotonic()
                continue
            if runs:  # listening on a name nobody can reach any more
                server.log.warning(
                    "instance store: its socket %s is gone (a cleaner?): starting it again",
                    path,
                )
                os.kill(pid, signal.SIGTERM)
            else:
                server.log.warning("instance store (pid %s) is gone: starting it again", pid)
            try:
                pid, started = _spawn(path, server.log)
            except OSError as exc:  # no descriptor or process to be had now: next round
                server.log.error("instance store: cannot start it (%s); trying again", exc)


def _parent(environ, uid):
    """Where the store's directory is made: ($RUNTIME_DIRECTORY, None) when it is a
    directory of ``uid``'s where no one else may make a name (the link itself is
    checked, never followed) and the socket's path fits there; else (None: the
    temporary directory, why not the runtime one, or None when there is none). systemd
    gives a service with several runtime directories all of them, separated by colons:
    the first is taken."""
    runtime = environ.get(RUNTIME_DIRECTORY, "").split(":")[0]
    if not runtime:
        return None, None
    if not os.path.isabs(runtime):
        return None, "is not an absolute path"
    try:
        # Others may look in (systemd's default mode is 755), never make or replace a
        # name: the store's own directory in it is this user's alone.
        unsafe = _unsafe_directory(os.lstat(runtime), uid, 0o022, "others may make names in it")
    except OSError as exc:
        return None, f"cannot be looked at ({exc})"
    if unsafe is not None:
        return None, unsafe
    longest = os.fsencode(os.path.join(runtime, DIR_PREFIX + "X" * 8, SOCKET))  # mkdtemp's 8
    if len(longest) > SOCKET_PATH_MAX:  # the store's bind would refuse it
        return None, f"is too long: the socket's path would have {len(longest)} bytes"
    return runtime, None


def start(server):
    """Start the instance store and its keeper; the workers forked from now on find its
    socket in GATEWAY_INSTANCE_STORE."""
    parent, refused = _parent(os.environ, os.geteuid())
    if refused is not None:
        server.log.warning(
            "instance store: %s %s %s; its socket goes in %s instead",
            RUNTIME_DIRECTORY,
            os.environ[RUNTIME_DIRECTORY],
            refused,
            tempfile.gettempdir(),
        )
    directory = tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent)  # this user's only
    path = os.path.join(directory, SOCKET)
    os.environ["GATEWAY_INSTANCE_STORE"] = path
    pid, started = _spawn(path, server.log)
    _keeping(server)  # made here, before the keeper or a stop can look for it
    threading.Thread(
        target=_keep,
        args=(server, path, pid, started),
        name="instance-store",
        daemon=True,
    ).start()


def stop(server):
    """Stop this master's instance store, if it has one: its keeper first, so that none
    starts again."""
    stopping, lock = _keeping(server)
    with lock:  # after a round the keeper is in, before its next
        stopping.set()
    path = os.environ.get("GATEWAY_INSTANCE_STORE")
    if not path or not os.path.basename(os.path.dirname(path)).startswith(DIR_PREFIX):
        return
    directory = os.path.dirname(path)
    try:
        with open(os.path.join(directory, PID_FILE)) as fh:
            pid, started = (int(field) for field in fh.read().split())
    except (OSError, ValueError):
        pid = started = None
    shutil.rmtree(directory, ignore_errors=True)
    if pid is not None and _runs(pid, started):
        os.kill(pid, signal.SIGTERM)
