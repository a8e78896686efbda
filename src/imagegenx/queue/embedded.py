"""The embedded job queue: one row per queued job in the task database (SQLite or PostgreSQL).

A row is ``ready`` (waiting, takeable once ``available_at`` has come) or ``leased`` (held by
``lease_owner`` until ``lease_until``); ack and remove delete it. Because the rows live in the task
database, a crashed process's jobs survive it: ``release_owner`` (on restart, with the previous
process's id) or ``recover_expired`` (any time after the lease ran out) makes them ready again.

Leasing is a read-then-write, so it runs in one transaction that no other leaser can interleave with:

* PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``. Concurrent leasers lock different rows and never
  wait for each other; a row another transaction changed meanwhile is re-checked against the WHERE
  clause before it is returned.
* SQLite has no row locks (SQLAlchemy renders no ``FOR UPDATE`` for it), so every writing transaction
  starts with ``BEGIN IMMEDIATE``: it takes the database's write lock before its first read, so leasers
  queue on the lock (the driver's busy timeout) instead of both reading the same ready row. A deferred
  ``BEGIN`` would not do: two readers that both try to upgrade to writing make SQLite fail one with
  "database is locked" at once, without waiting. See :meth:`EmbeddedQueue._write` for how that works
  with however the engine's owner set up the sqlite3 driver's transaction handling.

The table is created by the storage room's Alembic migration with exactly the columns of
:data:`queue_jobs`; :func:`create_table` is for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    cast,
    delete,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from imagegenx.queue.base import LANES, JobQueue, JoinableQueue, Lease
from imagegenx.queue.base import check_duration as _check_duration
from imagegenx.queue.base import check_id as _check_id
from imagegenx.queue.base import clock as _clock

READY = "ready"
LEASED = "leased"
# The task store's engines begin SQLite transactions with BEGIN IMMEDIATE unless a connection carries
# this execution option (storage.database.READ_ONLY; the queue room may not import storage). The queue's
# reads set it so that a metrics scrape does not take the write lock; other engines ignore it.
READ_ONLY_OPTION = "imagegenx_read_only"

metadata = MetaData()

queue_jobs = Table(
    "queue_jobs",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("lane", Integer, nullable=False),
    Column("batch_key", Text, nullable=False),
    Column("state", String(16), nullable=False),  # 'ready' | 'leased'
    Column("available_at", Float, nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("deliveries", Integer, nullable=False, default=0, server_default="0"),
    Column("enqueued_at", Float, nullable=False),
    Index("ix_queue_jobs_state_lane_available_at", "state", "lane", "available_at"),
)

_c = queue_jobs.c


def create_table(engine: Engine) -> None:
    """Create ``queue_jobs`` if it is missing. Tests only: production tables come from the migration."""
    metadata.create_all(engine, tables=[queue_jobs])


class EmbeddedQueue(JobQueue, JoinableQueue):
    """:class:`~imagegenx.queue.base.JobQueue` over the ``queue_jobs`` table of ``engine``'s database.

    It is a :class:`~imagegenx.queue.base.JoinableQueue` too: ``submit_many`` and ``ack_many`` run in
    a caller's transaction on the same engine when given its connection.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        aging_s: float = 10.0,
        write_gate: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"EmbeddedQueue needs SQLite or PostgreSQL, got {engine.dialect.name}")
        if not (math.isfinite(aging_s) and aging_s > 0):
            raise ValueError(f"aging_s must be finite and > 0, got {aging_s}")
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._aging_s = float(aging_s)
        # The task store's writer turns (TaskStore.writing): our writes queue with its writes.
        self._write_gate = write_gate or nullcontext

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One writing transaction, committed at the end, rolled back on error.

        On SQLite it holds the write lock from its first statement (``BEGIN IMMEDIATE``). The engine is
        shared with the task store, so this works however the sqlite3 driver's transactions are set up:

        * legacy transaction control (sqlite3's default before Python 3.16): the driver emits its own
          ``BEGIN`` only before INSERT/UPDATE/DELETE and only outside a transaction, so our explicit
          ``BEGIN IMMEDIATE`` comes first, and the driver's ``commit()``/``rollback()`` end it;
        * SQLAlchemy's documented pysqlite recipe (``isolation_level = None`` plus a ``begin`` event
          that emits ``BEGIN``; the task store's engines emit ``BEGIN IMMEDIATE`` there), or
          ``autocommit=False`` on Python 3.12+: a transaction, still empty, is already open when
          ``begin()`` returns. We cannot ask sqlite3 whether it holds the write lock, so it is rolled
          back and replaced by ours (one extra lock round trip, no I/O).
        """
        if not self._sqlite:
            with self._engine.begin() as conn:
                yield conn
            return
        with self._write_gate(), self._engine.connect() as conn:
            conn.begin()
            if getattr(conn.connection.dbapi_connection, "in_transaction", False):
                conn.exec_driver_sql("ROLLBACK")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn
            conn.commit()

    def _joined(self, conn: Connection | None):
        """The caller's transaction when given one (it commits), else a writing transaction of ours."""
        return nullcontext(conn) if conn is not None else self._write()

    def _read(self) -> Connection:
        """A connection for one read-only statement (a deferred transaction where that is a choice)."""
        return self._engine.connect().execution_options(**{READ_ONLY_OPTION: True})

    # -- ordering -------------------------------------------------------------------------------

    def _ready(self, now: float, batch_key: str | None) -> Select:
        """Ready, available jobs best first, locked (``FOR UPDATE SKIP LOCKED``) on PostgreSQL."""
        # effective lane = lane - floor(wait / aging_s). A takeable job has wait >= 0 (available_at,
        # never before enqueued_at, has come), so SQLite's CAST, which truncates, is floor here;
        # PostgreSQL's CAST rounds, so it gets floor().
        steps = (literal(now) - _c.enqueued_at) / self._aging_s
        steps = cast(steps, Integer) if self._sqlite else func.floor(steps)
        query = select(_c.task_id, _c.lane, _c.batch_key, _c.deliveries).where(
            _c.state == READY, _c.available_at <= now
        )
        if batch_key is not None:
            query = query.where(_c.batch_key == batch_key)
        return query.order_by(_c.lane - steps, _c.enqueued_at, _c.task_id).with_for_update(skip_locked=True)

    # -- JobQueue -------------------------------------------------------------------------------

    def submit(self, task_id: str, lane: int, batch_key: str, *, now: float | None = None) -> bool:
        with self._write() as conn:
            return conn.execute(self._insert([(task_id, lane, batch_key)], _clock(now))).rowcount == 1

    def submit_many(
        self,
        jobs: Sequence[tuple[str, int, str]],
        *,
        conn: Connection | None = None,
        now: float | None = None,
    ) -> None:
        if not jobs:
            return
        statement = self._insert(jobs, _clock(now))
        with self._joined(conn) as joined:
            joined.execute(statement)

    def _insert(self, jobs: Sequence[tuple[str, int, str]], now: float):
        """One multi-row ``INSERT ... ON CONFLICT DO NOTHING``: a job already queued stays as it is."""
        rows = []
        for task_id, lane, batch_key in jobs:
            _check_id("task_id", task_id)
            if lane not in LANES:
                raise ValueError(f"lane must be one of {LANES}, got {lane}")
            rows.append(
                {
                    "task_id": task_id,
                    "lane": int(lane),
                    "batch_key": batch_key,
                    "state": READY,
                    "available_at": now,
                    "deliveries": 0,
                    "enqueued_at": now,
                }
            )
        insert = (sqlite if self._sqlite else postgresql).insert(queue_jobs)
        return insert.values(rows).on_conflict_do_nothing(index_elements=[_c.task_id])

    def lease(
        self,
        owner: str,
        max_jobs: int,
        lease_s: float,
        *,
        batch_key: str | None = None,
        now: float | None = None,
    ) -> list[Lease]:
        _check_id("owner", owner)
        _check_duration("lease_s", lease_s)
        if max_jobs < 1:
            return []
        now = _clock(now)
        if self._sqlite and not self._any_ready(now, batch_key):
            return []  # an idle worker asks every few ms: nothing takeable, so no write lock taken
        with self._write() as conn:
            if batch_key is None:
                best = conn.execute(self._ready(now, None).limit(1)).first()
                if best is None:
                    return []
                batch_key = best.batch_key
            rows = conn.execute(self._ready(now, batch_key).limit(max_jobs)).all()
            if not rows:
                return []
            until = now + lease_s
            conn.execute(
                update(queue_jobs)
                .where(_c.task_id.in_([r.task_id for r in rows]))
                .values(state=LEASED, lease_owner=owner, lease_until=until, deliveries=_c.deliveries + 1)
            )
        return [Lease(r.task_id, r.lane, r.batch_key, r.deliveries + 1, until) for r in rows]

    def _any_ready(self, now: float, batch_key: str | None) -> bool:
        """Whether a job is takeable now, read without the write lock (the lease re-checks under it)."""
        query = select(_c.task_id).where(_c.state == READY, _c.available_at <= now)
        if batch_key is not None:
            query = query.where(_c.batch_key == batch_key)
        with self._read() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def heartbeat(
        self, owner: str, task_ids: list[str], lease_s: float, *, now: float | None = None
    ) -> list[str]:
        _check_duration("lease_s", lease_s)
        if not task_ids:
            return []
        now = _clock(now)
        statement = (
            update(queue_jobs)
            .where(_c.task_id.in_(set(task_ids)), _c.state == LEASED, _c.lease_owner == owner)
            .values(lease_until=now + lease_s)
            .returning(_c.task_id)
        )
        with self._write() as conn:
            held = set(conn.execute(statement).scalars())
        return [t for t in dict.fromkeys(task_ids) if t in held]

    def ack(self, owner: str, task_id: str) -> bool:
        return self.ack_many(owner, [task_id]) == 1

    def ack_many(self, owner: str, task_ids: Sequence[str], *, conn: Connection | None = None) -> int:
        if not task_ids:
            return 0
        statement = delete(queue_jobs).where(
            _c.task_id.in_(set(task_ids)), _c.state == LEASED, _c.lease_owner == owner
        )
        with self._joined(conn) as joined:
            return joined.execute(statement).rowcount

    def nack(self, owner: str, task_id: str, delay_s: float = 0.0, *, now: float | None = None) -> bool:
        _check_duration("delay_s", delay_s)
        statement = (
            update(queue_jobs)
            .where(_c.task_id == task_id, _c.state == LEASED, _c.lease_owner == owner)
            .values(state=READY, lease_owner=None, lease_until=None, available_at=_clock(now) + delay_s)
        )
        with self._write() as conn:
            return conn.execute(statement).rowcount == 1

    def remove(self, task_id: str) -> bool:
        with self._write() as conn:
            return conn.execute(delete(queue_jobs).where(_c.task_id == task_id)).rowcount == 1

    def recover_expired(self, *, now: float | None = None) -> int:
        # available_at stays as it was (it had come when the job was leased): ready at once, and
        # enqueued_at keeps the job's age, so a redelivered job is not sent to the back.
        return self._release(_c.lease_until <= _clock(now))

    def release_owner(self, owner: str) -> int:
        return self._release(_c.lease_owner == owner)

    def _release(self, condition) -> int:
        statement = (
            update(queue_jobs)
            .where(_c.state == LEASED, condition)
            .values(state=READY, lease_owner=None, lease_until=None)
        )
        with self._write() as conn:
            return conn.execute(statement).rowcount

    def depth(self) -> dict[int, int]:
        query = select(_c.lane, func.count()).where(_c.state == READY).group_by(_c.lane)
        with self._read() as conn:
            counts = dict(conn.execute(query).all())
        return {lane: counts.get(lane, 0) for lane in LANES}

    def oldest_wait(self, *, now: float | None = None) -> dict[int, float]:
        now = _clock(now)
        query = select(_c.lane, func.min(_c.enqueued_at)).where(_c.state == READY).group_by(_c.lane)
        with self._read() as conn:
            oldest = dict(conn.execute(query).all())
        return {lane: max(0.0, now - oldest[lane]) if lane in oldest else 0.0 for lane in LANES}
