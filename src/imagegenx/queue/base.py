"""The job queue contract every backend keeps (embedded rows in the task DB today, NATS JetStream later).

A queue message is only a task id, its priority lane and its batch key: the task store is the source of
truth for everything else. The life of one job::

    submit ──▶ ready ──lease──▶ leased ──ack──▶ gone (results committed)
                 ▲                 │
                 └── nack / lease expired + recover_expired / release_owner
    remove: gone from either state (a queued task cancelled or expired)

Rules the contract tests (``tests/test_queue.py``) hold every backend to:

* **De-duplication by task id.** ``submit`` of a task that is still queued (ready or leased) is a no-op
  that returns ``False``. Once acked or removed, the id is free again.
* **Order.** Ready jobs are taken by *effective lane* ``lane - floor(wait / aging_s)`` (``wait`` is the
  time since ``submit``, never negative), then by enqueue time, then by task id. A P3 job draws level
  with fresh P0 work after ``3 * aging_s``: no lane starves.
* **One batch key per lease.** ``lease`` without ``batch_key`` takes the best ready job and then only
  jobs of that job's key; with ``batch_key`` (a worker topping up a running batch) only that key.
* **At-least-once.** A lease lasts ``lease_s`` unless its owner heartbeats. When it has passed,
  ``recover_expired`` makes the job ready again and the next lease reports ``delivery`` 2, 3, ...; the
  engine fails a job whose delivery count goes over its cap. A job is acked only after its results are
  committed, and only its current owner can ack or nack it.
* **Never twice at once.** Two leases, from any threads or processes, never hold the same job.

Times are ``time.time()`` floats. Every ``now`` parameter defaults to the current time; tests pass it to
control the clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from imagegenx.types import Priority

LANES = tuple(int(p) for p in Priority)


def clock(now: float | None) -> float:
    """``now`` if the caller runs its own clock, else the current time."""
    return time.time() if now is None else float(now)


def check_id(what: str, value: str) -> None:
    if not value or len(value) > 64:
        raise ValueError(f"{what} must be 1-64 characters, got {value!r}")


def check_duration(what: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be finite and >= 0, got {value}")


@dataclass(frozen=True)
class Lease:
    """One job handed to a worker until ``lease_until`` (or until acked, nacked or heartbeated)."""

    task_id: str
    lane: int
    batch_key: str
    delivery: int  # 1 on first delivery, 2 after one redelivery, ...
    lease_until: float


@runtime_checkable
class JobQueue(Protocol):
    """Durable, prioritised, de-duplicated work queue with leases (see the module docs for the rules)."""

    def submit(self, task_id: str, lane: int, batch_key: str, *, now: float | None = None) -> bool:
        """Queue a task in ``lane`` (0 = P0 ... 3 = P3). ``False`` if it is already queued."""
        ...

    def lease(
        self,
        owner: str,
        max_jobs: int,
        lease_s: float,
        *,
        batch_key: str | None = None,
        now: float | None = None,
    ) -> list[Lease]:
        """Up to ``max_jobs`` ready jobs of one batch key, best first, held by ``owner`` for ``lease_s``."""
        ...

    def heartbeat(
        self, owner: str, task_ids: list[str], lease_s: float, *, now: float | None = None
    ) -> list[str]:
        """Extend to ``now + lease_s`` the leases ``owner`` still holds; returns those task ids.

        A lease past its time that nobody has recovered yet is still held: nobody else has the job.
        """
        ...

    def ack(self, owner: str, task_id: str) -> bool:
        """The job is done (results committed): delete it. ``False`` unless ``owner`` holds it."""
        ...

    def nack(self, owner: str, task_id: str, delay_s: float = 0.0, *, now: float | None = None) -> bool:
        """Give the job back: ready again after ``delay_s``. ``False`` unless ``owner`` holds it."""
        ...

    def remove(self, task_id: str) -> bool:
        """A queued task was cancelled or expired: delete it whoever holds it. ``False`` if not queued."""
        ...

    def recover_expired(self, *, now: float | None = None) -> int:
        """Make every job whose lease has passed (``lease_until <= now``) ready again; returns how many."""
        ...

    def release_owner(self, owner: str) -> int:
        """Make every job ``owner`` holds ready again (a restarted process frees its predecessor's)."""
        ...

    def depth(self) -> dict[int, int]:
        """Ready jobs per lane, every lane 0..3 present (delayed nacks included), for metrics."""
        ...

    def oldest_wait(self, *, now: float | None = None) -> dict[int, float]:
        """Seconds since submit of the oldest ready job in each lane (0.0 for an empty lane)."""
        ...


@runtime_checkable
class JoinableQueue(Protocol):
    """A queue whose rows live in a SQL database (the embedded queue) and whose writes can join a
    transaction that a caller opened on the same SQLAlchemy ``engine`` (the task store's).

    The service then commits a task row with its queue entry, and a finished task's row with the
    entry's ack, in one transaction each: two fsyncs fewer per task, and no crash can fall between
    the two. ``conn`` is such a transaction's connection; without it each call commits on its own.
    """

    @property
    def engine(self) -> Any:
        """The SQLAlchemy engine the queue's rows live in."""
        ...

    def submit_many(
        self, jobs: Sequence[tuple[str, int, str]], *, conn: Any = None, now: float | None = None
    ) -> None:
        """``submit`` for several ``(task_id, lane, batch_key)`` jobs (already queued ones unchanged)."""
        ...

    def ack_many(self, owner: str, task_ids: Sequence[str], *, conn: Any = None) -> int:
        """``ack`` for several jobs; returns how many ``owner`` held (and are now gone)."""
        ...
