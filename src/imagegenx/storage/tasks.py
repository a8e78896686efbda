"""The task store: durable task rows (and API keys, keys.py) in SQLite or PostgreSQL, via SQLAlchemy 2 Core.

The database is the source of truth for a task's status, progress and history (DESIGN.md); queue
messages carry only ids. Every method is one short transaction and takes or returns plain
``TaskRecord`` / ``ApiKey`` dataclasses, so no SQLAlchemy object leaves the store.

State changes are single conditional ``UPDATE``s whose ``WHERE`` states the allowed transition, so two
processes racing on one task cannot both win: the row count says who did. Attempts are fencing tokens:

* ``start(task_id, attempt)`` records the attempt of the delivery that starts the task (the latest
  start wins; it returns False only for final tasks and requested cancels, which the worker relies on).
* ``succeed`` needs ``status == processing`` and ``attempts == attempt``: a stale attempt never
  overwrites a newer one, and a task completes at most once. ``fail(..., attempt=n)`` is fenced alike.

The store is split by job: database.py (engines, SQLite pragmas, ``StorageUnavailable``, transactions),
schema.py (the tables), rows.py (row/record conversion, the shared state-change statements), keys.py
(API keys) and this module (the task operations). ``TaskStore.engine`` is the engine; the embedded
queue runs its statements on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import URL, Connection

from imagegenx.storage.database import StorageUnavailable, fill_sqlite_pool, make_engine
from imagegenx.storage.keys import ApiKeyStore
from imagegenx.storage.rows import (
    ACTIVE,
    FINAL,
    canceled_stmt,
    start_stmt,
    succeed_stmt,
    task_record,
    task_row,
)
from imagegenx.storage.schema import tasks_table
from imagegenx.types import TaskRecord, TaskStatus

if TYPE_CHECKING:
    from imagegenx.config import StorageSettings

# StorageUnavailable is re-exported: engine/worker.py imports it from here.
__all__ = ["Completion", "StorageUnavailable", "TaskExists", "TaskStore"]


class QueueLoad(NamedTuple):
    queued: int  # queued tasks of every key
    active: int  # the asking key's queued and running tasks
    oldest_queued_at: float | None  # creation time of the oldest queued task (None: none queued)


class TaskExists(ValueError):
    """``create`` was given a task id that is already stored; nothing of the batch was written."""


@dataclass(frozen=True)
class Completion:
    """One finished attempt for ``succeed_many``. ``start``: record the start first, in the same
    transaction (the worker had not written it yet: a 1-step job, or the database was away)."""

    task_id: str
    attempt: int
    results: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    start: bool = False


# Joins a caller's statements to a store transaction (the embedded queue shares the store's engine).
Then = Callable[[Connection], object] | None

_t = tasks_table.c


class TaskStore(ApiKeyStore):
    """Tasks and API keys over one SQLAlchemy engine. Thread-safe: each call checks out a connection.

    ``migrate=True`` brings the schema to head first (and so connects at once: an unreachable
    database raises ``StorageUnavailable`` here). With ``migrate=False`` nothing connects until the
    first call, so a service can start while its database is still down and answer 503 meanwhile.
    """

    def __init__(
        self, database_url: str | URL, *, migrate: bool = True, pool_size: int = 5, max_overflow: int = 10
    ) -> None:
        super().__init__(make_engine(database_url, pool_size=pool_size, max_overflow=max_overflow))
        if migrate:
            from imagegenx.storage.migrate import upgrade_connection

            try:
                with self._tx() as conn:
                    upgrade_connection(conn)
                fill_sqlite_pool(self.engine)
            except BaseException:
                self.engine.dispose()
                raise

    @classmethod
    def from_settings(cls, settings: StorageSettings, *, migrate: bool = True) -> TaskStore:
        return cls(
            settings.database_url,
            migrate=migrate,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )

    def create(self, records: list[TaskRecord], *, then: Then = None) -> None:
        """Insert tasks in one transaction: a batch is stored whole or not at all.

        ``then(conn)`` runs inside that transaction before it commits (the embedded queue's rows for
        these tasks, so that a task and its queue entry exist together or not at all).
        Raises ``TaskExists`` (and stores nothing) when an id is taken.
        """
        if not records:
            return
        now = time.time()
        rows = [task_row(r, now) for r in records]
        try:
            with self._tx() as conn:
                conn.execute(sa.insert(tasks_table), rows)
                if then is not None:
                    then(conn)
        except exc.IntegrityError as error:
            raise TaskExists(f"batch not stored (duplicate task id?): {error.orig}") from error

    def get(self, task_id: str, user_id: str | None = None) -> TaskRecord | None:
        """The task, or None; with ``user_id`` only if it belongs to that user."""
        stmt = sa.select(tasks_table).where(_t.task_id == task_id)
        if user_id is not None:
            stmt = stmt.where(_t.user_id == user_id)
        with self._tx(read_only=True) as conn:
            row = conn.execute(stmt).mappings().first()
        return None if row is None else task_record(row)

    def get_many(self, task_ids: Iterable[str]) -> list[TaskRecord]:
        """The tasks among ``task_ids`` that exist, in no particular order (one query)."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return []
        with self._tx(read_only=True) as conn:
            rows = conn.execute(sa.select(tasks_table).where(_t.task_id.in_(ids))).mappings().all()
        return [task_record(r) for r in rows]

    def query(
        self,
        user_id: str,
        *,
        status: TaskStatus | str | Iterable[TaskStatus | str] | None = None,
        style: str | None = None,
        width: int | None = None,
        height: int | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> tuple[list[TaskRecord], int]:
        """A user's tasks, newest first, and how many match in all (for pagination).

        ``status`` is one status or several; ``since`` <= created_at < ``until``.
        """
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0, got {limit} and {offset}")
        where = [_t.user_id == user_id]
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(_t.status.in_([TaskStatus(s).value for s in statuses]))
        if style is not None:
            where.append(_t.style == style)
        if width is not None:
            where.append(_t.width == width)
        if height is not None:
            where.append(_t.height == height)
        if since is not None:
            where.append(_t.created_at >= since)
        if until is not None:
            where.append(_t.created_at < until)
        page = (
            sa.select(tasks_table)
            .where(*where)
            .order_by(_t.created_at.desc(), _t.task_id.desc())
            .limit(limit)
            .offset(offset)
        )
        count = sa.select(sa.func.count()).select_from(tasks_table).where(*where)
        with self._tx(read_only=True) as conn:
            total = conn.execute(count).scalar_one()
            rows = conn.execute(page).mappings().all() if limit else []
        return [task_record(r) for r in rows], total

    def active_count(self, user_id: str) -> int:
        """The user's queued + processing tasks (the per-key queue quota counts these)."""
        stmt = sa.select(sa.func.count()).where(_t.user_id == user_id, _t.status.in_(ACTIVE))
        with self._tx(read_only=True) as conn:
            return conn.execute(stmt).scalar_one()

    def queued_total(self) -> int:
        """All queued tasks (the service refuses new work beyond ``max_queued_tasks``)."""
        stmt = sa.select(sa.func.count()).where(_t.status == TaskStatus.QUEUED.value)
        with self._tx(read_only=True) as conn:
            return conn.execute(stmt).scalar_one()

    def load(self, user_id: str) -> QueueLoad:
        """The queue's load and ``user_id``'s unfinished tasks, read in one transaction (each request
        asks; the oldest queued task's creation time is one step of the (status, created_at) index)."""
        queued = sa.select(sa.func.count(), sa.func.min(_t.created_at)).where(
            _t.status == TaskStatus.QUEUED.value
        )
        active = sa.select(sa.func.count()).where(_t.user_id == user_id, _t.status.in_(ACTIVE))
        with self._tx(read_only=True) as conn:
            count, oldest = conn.execute(queued).one()
            return QueueLoad(count, conn.execute(active).scalar_one(), oldest)

    def start(self, task_id: str, attempt: int) -> bool:
        """queued/processing → processing for ``attempt`` (progress restarts at 0; a redelivery takes
        over, so only that attempt can then succeed). False when the task is final or cancel was requested.
        """
        return self._changed(start_stmt(task_id, attempt, time.time()))

    def start_many(self, starts: Mapping[str, int]) -> set[str]:
        """``start`` for several tasks (task id → attempt) in one transaction: a worker records the
        start of a whole UNet batch with one commit. Returns the ids that started."""
        if not starts:
            return set()
        now = time.time()
        with self._tx() as conn:
            return {
                task_id
                for task_id, attempt in starts.items()
                if conn.execute(start_stmt(task_id, attempt, now)).rowcount == 1
            }

    def set_progress(self, task_id: str, progress: int) -> None:
        """Progress 0-100 of a processing task (ignored once the task is no longer processing)."""
        self.set_progress_many({task_id: progress})

    def set_progress_many(self, progress: Mapping[str, int]) -> None:
        """``set_progress`` for several tasks in one transaction (a worker's periodic flush)."""
        if not progress:
            return
        now = time.time()
        stmt = (
            sa.update(tasks_table)
            .where(_t.task_id == sa.bindparam("tid"), _t.status == TaskStatus.PROCESSING.value)
            .values(progress=sa.bindparam("value"), updated_at=now)
        )
        rows = [{"tid": t, "value": max(0, min(100, int(p)))} for t, p in progress.items()]
        with self._tx() as conn:
            conn.execute(stmt, rows)

    def succeed(self, task_id: str, attempt: int, results: dict, metadata: dict) -> bool:
        """processing → succeeded, only for the current attempt; True if this call completed the task."""
        return self._changed(succeed_stmt(task_id, attempt, results, metadata, time.time()))

    def succeed_many(self, completions: Sequence[Completion], *, then: Then = None) -> set[str]:
        """``succeed`` for several tasks in one transaction; returns the ids this call completed.

        A completion with ``start`` is started first (same fencing as ``start``); if the start is
        refused because a cancel was requested, the task becomes canceled instead, as the worker
        would have stopped it at its first step. ``then(conn)`` runs before the commit (the embedded
        queue's acks: a task is final and its queue entry gone together, or neither).
        """
        now = time.time()
        done: set[str] = set()
        with self._tx() as conn:
            for item in completions:
                if item.start and conn.execute(start_stmt(item.task_id, item.attempt, now)).rowcount != 1:
                    conn.execute(canceled_stmt(item.task_id, now, requested_only=True))
                    continue
                stmt = succeed_stmt(item.task_id, item.attempt, item.results, item.metadata, now)
                if conn.execute(stmt).rowcount == 1:
                    done.add(item.task_id)
            if then is not None:
                then(conn)
        return done

    def fail(self, task_id: str, error: str, attempt: int | None = None) -> bool:
        """queued/processing → failed with ``error``; with ``attempt``, only for that attempt."""
        now = time.time()
        where = [_t.task_id == task_id, _t.status.in_(ACTIVE)]
        if attempt is not None:
            where.append(_t.attempts == attempt)
        stmt = (
            sa.update(tasks_table)
            .where(*where)
            .values(status=TaskStatus.FAILED.value, error=error, finished_at=now, updated_at=now)
        )
        return self._changed(stmt)

    def cancel(self, task_id: str, user_id: str | None = None) -> TaskStatus | None:
        """Cancel a task: queued → CANCELED at once; processing → cancel requested (returns PROCESSING,
        the worker stops at its next step and calls ``mark_canceled``); final → its status, unchanged.
        None when there is no such task (or it belongs to another user).
        """
        now = time.time()
        own = [_t.task_id == task_id] + ([] if user_id is None else [_t.user_id == user_id])
        with self._tx() as conn:
            queued = conn.execute(
                sa.update(tasks_table)
                .where(*own, _t.status == TaskStatus.QUEUED.value)
                .values(status=TaskStatus.CANCELED.value, finished_at=now, updated_at=now)
            )
            if queued.rowcount:
                return TaskStatus.CANCELED
            processing = conn.execute(
                sa.update(tasks_table)
                .where(*own, _t.status == TaskStatus.PROCESSING.value)
                .values(cancel_requested=True, updated_at=now)
            )
            if processing.rowcount:
                return TaskStatus.PROCESSING
            status = conn.execute(sa.select(_t.status).where(*own)).scalar_one_or_none()
        return None if status is None else TaskStatus(status)

    def mark_canceled(self, task_id: str) -> bool:
        """processing → canceled (the worker honoured a cancel request)."""
        return self._changed(canceled_stmt(task_id, time.time()))

    def expire_queued(self, older_than_s: float, now: float | None = None) -> list[str]:
        """Queued tasks created before ``now - older_than_s`` → expired; returns their ids."""
        now = time.time() if now is None else now
        stmt = (
            sa.update(tasks_table)
            .where(_t.status == TaskStatus.QUEUED.value, _t.created_at < now - older_than_s)
            .values(
                status=TaskStatus.EXPIRED.value,
                error=f"expired: queued longer than {older_than_s:g} s",
                finished_at=now,
                updated_at=now,
            )
            .returning(_t.task_id)
        )
        with self._tx() as conn:
            return list(conn.execute(stmt).scalars())

    def purge_before(self, cutoff: float, *, limit: int | None = None) -> list[TaskRecord]:
        """Delete final tasks created before ``cutoff`` and return them (their blobs go next).

        ``limit`` bounds one call (call again until it returns fewer); None deletes all at once.
        """
        where = [_t.status.in_(FINAL), _t.created_at < cutoff]
        if limit is not None:
            ids = sa.select(_t.task_id).where(*where).order_by(_t.created_at).limit(limit)
            where.append(_t.task_id.in_(ids.scalar_subquery()))
        stmt = sa.delete(tasks_table).where(*where).returning(*tasks_table.c)
        with self._tx() as conn:
            rows = conn.execute(stmt).mappings().all()
        return sorted((task_record(r) for r in rows), key=lambda r: (r.created_at, r.task_id))
