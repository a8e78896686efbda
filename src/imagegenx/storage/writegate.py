"""One SQLite writer at a time, handed over as soon as the last one ends.

SQLite lets one transaction write at a time; a writer that finds the lock taken is put to sleep by
SQLite's busy handler and polls again after 1, 2, 5, 10 ... 100 ms. Under a stream of short writes
(the API accepting 100 tasks a second, each group commit a few ms) a waiting writer keeps losing the
race: on an H200 the worker, storing results and taking leases, spent most of its time asleep there
and the service completed 6-11 tasks/s of the 100 offered while the GPU idled.

The gate queues writers before they ask SQLite: the threads of a process on a lock, which wakes the
next waiter as the holder leaves; processes (``serve --worker-process``, API nodes and workers on one
SQLite file) on an ``flock`` of a file beside the database, polled every millisecond. A process takes
that lock only after a second one, the turnstile, which it keeps until it is in: the process already
waiting holds the turnstile, so the one that just left cannot win the race again (without it, an API
committing back to back at 150 requests/s starved a worker process's writes for seconds, and the
service completed almost nothing until the requests stopped). It only orders writers: after
``WAIT_S`` a writer goes ahead without it, and SQLite's own locking keeps the data consistent.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

WAIT_S = 5.0  # as SQLite's busy_timeout: past it, the writer proceeds and SQLite decides
POLL_S = 0.001

_gates: dict[str, WriteGate] = {}
_gates_lock = threading.Lock()


class WriteGate:
    """The writers of one database file; share one per file (``gate_for``)."""

    def __init__(self, lock_path: Path) -> None:
        self.lock_path = lock_path
        self.turn_path = lock_path.with_name(lock_path.name + "-turn")
        self._threads = threading.RLock()
        self._depth = 0  # nested holds by the thread inside (a queue write within a store write)
        self._fd: int | None = None
        self._turn_fd: int | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the gate for one write transaction (re-entrant within a thread)."""
        inside = self._threads.acquire(timeout=WAIT_S)
        try:
            if inside:
                self._depth += 1
            locked = inside and self._depth == 1 and self._lock_file()
            try:
                yield
            finally:
                if locked:
                    self._unlock_file()
                if inside:
                    self._depth -= 1
        finally:
            if inside:
                self._threads.release()

    def _lock_file(self) -> bool:
        import fcntl

        try:
            if self._fd is None:
                self._turn_fd = os.open(self.turn_path, os.O_RDWR | os.O_CREAT, 0o644)
                self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + WAIT_S
            if not _poll_flock(self._turn_fd, deadline):  # next in line once we hold the turnstile
                return False
            try:
                return _poll_flock(self._fd, deadline)
            finally:
                fcntl.flock(self._turn_fd, fcntl.LOCK_UN)
        except OSError:  # a read-only folder: order the threads only
            return False

    def _unlock_file(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


def _poll_flock(fd: int, deadline: float) -> bool:
    """Take ``fd``'s exclusive flock, polling until ``deadline``; False if it stayed taken."""
    import fcntl

    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)


def gate_for(database: str | None) -> WriteGate | None:
    """The gate of an SQLite database file (one per file in this process); None for an in-memory
    database (one shared connection already) or where ``flock`` does not exist."""
    if not database or database == ":memory:" or os.name != "posix":
        return None
    path = Path(database).expanduser().resolve()
    with _gates_lock:
        gate = _gates.get(str(path))
        if gate is None:
            gate = _gates[str(path)] = WriteGate(path.with_name(path.name + ".writer-lock"))
        return gate
