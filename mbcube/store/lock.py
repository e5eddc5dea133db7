"""One writer per store: an exclusive lock held by the process that runs steps on it.

The lock is `fcntl.flock` on the file `STORE/.mbcube.lock`, which holds who took it (pid, host,
command, start time, as JSON). The kernel releases a flock when its process ends, however it
ends, so a killed run never leaves the store locked: the next writer finds the file of the
dead holder, says so (a stale lock: that run was interrupted, and this one resumes it) and takes
over. The file is removed when the holder releases the lock, so a store at rest holds no extra
file. A second writer is refused at once with a one-line `StoreLocked` naming the holder;
readers (`mbcube info`, `xr.open_zarr`, the `ds.mb` accessor) take no lock and never wait.

flock works between processes of one machine and, on Linux, between hosts of an NFS v4 or Lustre
(mounted with `flock`) file system. The lock is re-entrant within a process, so a step called
from `mbcube run` (which holds it) does not lock itself out.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from mbcube.errors import StoreLocked

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

LOCK_NAME = ".mbcube.lock"
#: Tries (and seconds between them) before another writer's lock refuses this one.
READER_RETRIES, READER_RETRY_S = 20, 0.025

_held: dict[Path, list[int]] = {}  # resolved store path -> [file descriptor, depth]
_guard = threading.Lock()


@contextmanager
def writer_lock(store: Path | str) -> Iterator[None]:
    """Hold the store's writer lock for the block (the store folder is created if missing).
    Raises StoreLocked when another process holds it."""
    path = Path(store).resolve()
    with _guard:
        if path in _held:
            _held[path][1] += 1
        else:
            _held[path] = [_acquire(path), 1]
    try:
        yield
    finally:
        with _guard:
            held = _held[path]
            held[1] -= 1
            if held[1] == 0:
                del _held[path]
                _release(path, held[0])


@contextmanager
def writer_lock_if_writable(store: Path | str) -> Iterator[bool]:
    """The writer lock when the store can be written (yields True); on a store this process may
    not write (a read-only file system, no permission), no lock (yields False): no writer can
    change it through this process, and the caller only reads. A lock held by another process
    still refuses (StoreLocked)."""
    with ExitStack() as stack:
        try:
            stack.enter_context(writer_lock(store))
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            yield False
            return
        yield True


def writes_store(func: Callable[Concatenate[Path, P], R]) -> Callable[Concatenate[Path, P], R]:
    """Decorate a step `func(store, ...)` to run holding the store's writer lock."""

    @functools.wraps(func)
    def locked(store: Path, *args: P.args, **kwargs: P.kwargs) -> R:
        with writer_lock(store):
            return func(Path(store), *args, **kwargs)

    return locked


def holds_lock(store: Path | str) -> bool:
    """This process holds the writer lock of `store`."""
    return Path(store).resolve() in _held


def writer_status(store: Path | str) -> str | None:
    """Who writes the store now ("... (writing)"), or that the last writer ended without
    releasing it ("... (interrupted: the next run resumes its work)"); None when no writer
    left a trace. Takes no lock and never waits (a shared lock tried once, released at once)."""
    lock_file = Path(store) / LOCK_NAME
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        holder = _read(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f"{_describe(holder)} (writing)"
        if not holder:
            return None
        return f"{_describe(holder)} (interrupted: the next run resumes its work)"
    finally:
        os.close(fd)


def _acquire(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / LOCK_NAME
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _flock_retrying(fd)
        except OSError as err:
            holder = _read(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise StoreLocked(
                f"{path}: another mbcube process is writing this store ({_describe(holder)}). "
                "Wait for it to finish, or use another --store; reading it (mbcube info, "
                "xr.open_zarr) needs no lock."
            ) from None
        # the holder before us may have removed the file between our open and our flock: then
        # we locked a file nobody else will see, and must lock the one at the path instead
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _read(fd)
    if stale:
        log.warning(
            "%s: the last writer (%s) ended without releasing the store (killed?); "
            "its unfinished work is redone.",
            path,
            _describe(stale),
        )
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
        "since_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)  # who holds it: advisory, not synced to disk
    return fd


def _flock_retrying(fd: int) -> None:
    """Take the exclusive lock without waiting for a writer: a few tries over ~0.5 s, so that a
    reader's instant check (`writer_status`) does not turn a writer away."""
    for _ in range(READER_RETRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(READER_RETRY_S)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _release(path: Path, fd: int) -> None:
    try:
        (path / LOCK_NAME).unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


def _read(fd: int) -> dict[str, object]:
    try:
        raw = os.pread(fd, 4096, 0)
        found = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _describe(holder: dict[str, object]) -> str:
    if not holder:
        return "holder unknown"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, "
        f"'{holder.get('command')}' since {holder.get('since_utc')}"
    )
