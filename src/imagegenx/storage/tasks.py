"""The task store: durable task rows and API keys in SQLite or PostgreSQL, through SQLAlchemy 2 Core.

The database is the source of truth for a task's status, progress and history (DESIGN.md); queue
messages carry only ids. Every method is one short transaction and takes or returns plain
``TaskRecord`` / ``ApiKey`` dataclasses, so no SQLAlchemy object leaves this module.

State changes are single conditional ``UPDATE``s whose ``WHERE`` states the allowed transition, so two
processes racing on one task cannot both win: the row count says who did. Attempts are fencing tokens:

* ``start(task_id, attempt)`` records the attempt of the delivery that starts the task (the latest
  start wins; it returns False only for final tasks and requested cancels, which the worker relies on).
* ``succeed`` needs ``status == processing`` and ``attempts == attempt``: a stale attempt never
  overwrites a newer one, and a task completes at most once. ``fail(..., attempt=n)`` is fenced alike.

Engines (``make_engine``):

* SQLite: ``check_same_thread=False``, WAL journal, ``busy_timeout=5000`` and foreign keys, set on each
  new connection. SQLAlchemy emits ``BEGIN`` itself (the recipe in SQLAlchemy's SQLite docs), and a
  transaction is ``BEGIN IMMEDIATE`` unless the connection carries the execution option
  ``READ_ONLY`` (``conn.execution_options(**{READ_ONLY: True})``): a writer takes the write lock
  before its first read, so read-then-write transactions (the queue's lease) never fail with
  ``SQLITE_BUSY`` halfway, and concurrent writers wait up to 5 s instead.
* PostgreSQL through psycopg 3 (``postgresql+psycopg://``; plain ``postgresql://`` and ``postgres://``
  URLs are mapped to it). The store is synchronous on purpose, so a sync driver fits: it is called
  from worker threads and from FastAPI's threadpool (sync routes), never from an event loop, and
  asyncpg would need an async engine plus a loop hop on every call for no gain. Connections come
  from a pool per process: ``pool_size`` kept open (default 5) plus up to ``max_overflow`` more under
  load (default 10; ``StorageSettings.db_pool_size`` / ``db_max_overflow``), ``pool_pre_ping`` (a
  restarted server costs no failed request), recycled after 30 min, a 5 s connect timeout and a 5 s
  wait for a free connection (then ``StorageUnavailable``: 503 with Retry-After, not a hung request).
  Size it so that (API nodes + workers) × (pool_size + max_overflow) stays below the server's
  ``max_connections`` (100 by default), or put PgBouncer in front.

``TaskStore.engine`` is that engine; the embedded queue runs its statements on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url

from imagegenx.types import ApiKey, TaskRecord, TaskStatus, Tier

if TYPE_CHECKING:
    from imagegenx.config import StorageSettings

__all__ = [
    "READ_ONLY",
    "Completion",
    "StorageUnavailable",
    "TaskExists",
    "TaskStore",
    "api_keys_table",
    "make_engine",
    "metadata",
    "resolve_url",
    "storage_errors",
    "tasks_table",
]

READ_ONLY = "imagegenx_read_only"  # execution option: plain deferred BEGIN on SQLite
KEY_PREFIX = "igx_"

_ACTIVE = (TaskStatus.QUEUED.value, TaskStatus.PROCESSING.value)
_FINAL = tuple(s.value for s in TaskStatus if s.final)


class StorageUnavailable(RuntimeError):
    """The database cannot be reached (or is locked beyond the busy timeout): answer 503 and retry."""


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


# --- schema ------------------------------------------------------------------------------------------
# Mirrors migrations/versions/ (0001 and 0002; a test compares the two). ``queue_jobs`` is the queue room's
# table and deliberately absent here.

metadata = sa.MetaData()

tasks_table = sa.Table(
    "tasks",
    metadata,
    sa.Column("task_id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(64), nullable=False),
    sa.Column("batch_id", sa.String(64), nullable=True),
    sa.Column("task_type", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer(), nullable=False),
    sa.Column("params", sa.JSON(), nullable=False),
    sa.Column("model", sa.String(255), nullable=False, server_default=""),
    sa.Column("width", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.Column("height", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.Column("style", sa.String(128), nullable=True),
    sa.Column("progress", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("started_at", sa.Double(), nullable=True),
    sa.Column("finished_at", sa.Double(), nullable=True),
    sa.Column("updated_at", sa.Double(), nullable=False),
    sa.Column("results", sa.JSON(), nullable=False),
    sa.Column("meta", sa.JSON(), nullable=False),  # TaskRecord.metadata ("metadata" is reserved in ORMs)
    sa.Column("callback_url", sa.Text(), nullable=True),
    sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Index("ix_tasks_task_id_user_id", "task_id", "user_id", unique=True),
    sa.Index("ix_tasks_user_id_created_at", "user_id", "created_at"),
    sa.Index("ix_tasks_status_created_at", "status", "created_at"),
    sa.Index("ix_tasks_batch_id", "batch_id"),
    sa.Index("ix_tasks_created_at", "created_at"),  # 0002: the history purge scans by creation time
)

api_keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("rate_limit_per_s", sa.Double(), nullable=False),
    sa.Column("queue_quota", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("revoked_at", sa.Double(), nullable=True),
    sa.Index("ix_api_keys_secret_hash", "secret_hash", unique=True),
)

_t = tasks_table.c
_k = api_keys_table.c


# --- engines -----------------------------------------------------------------------------------------


def resolve_url(database_url: str | URL) -> URL:
    """The URL with PostgreSQL's driver made explicit: ``postgresql://`` and ``postgres://`` mean
    psycopg 3 here (SQLAlchemy's own default would be psycopg2)."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def make_engine(
    database_url: str | URL,
    *,
    pooled: bool = True,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_timeout: float = 5.0,
) -> Engine:
    """A configured engine for SQLite or PostgreSQL (see the module docs). Connects lazily.

    ``pooled=False`` (one-off work such as migrations) opens a fresh connection each time.
    """
    url = resolve_url(database_url)
    backend = url.get_backend_name()
    kwargs: dict[str, Any] = {}
    if not pooled:
        kwargs["poolclass"] = sa.NullPool
    if backend == "sqlite":
        in_memory = url.database in (None, "", ":memory:")
        if in_memory:
            # One shared connection, or every checkout would see its own empty database.
            kwargs["poolclass"] = sa.StaticPool
        else:
            # Best effort: if the folder cannot be made, connecting fails with StorageUnavailable.
            with contextlib.suppress(OSError):
                Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            if pooled:
                # As many connections as before, but all kept: SQLite cannot close a connection's
                # file while another connection of the process holds a lock on it (POSIX locks are
                # per process), so each overflow connection closed under load left its descriptor
                # open, and the process's open files grew with its peak load.
                kwargs.update(pool_size=pool_size + max_overflow, max_overflow=0)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False}, **kwargs)
        _configure_sqlite(engine, wal=not in_memory)
        return engine
    if backend == "postgresql":
        connect_args = {}
        if url.get_driver_name() in ("psycopg2", "psycopg") and "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = 5
        if pooled:
            kwargs.update(
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_pre_ping=True,
                pool_recycle=1800,
                pool_timeout=pool_timeout,
            )
        return sa.create_engine(url, connect_args=connect_args, **kwargs)
    return sa.create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Hand transaction control to SQLAlchemy (see _on_begin), then set per-connection pragmas.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout = 5000")
            if wal:
                # synchronous stays FULL: a commit survives power loss, not only a crash of the process.
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _is_unavailable(error: exc.DBAPIError) -> bool:
    return isinstance(error, exc.OperationalError) or error.connection_invalidated


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Turn "cannot reach / lost / locked database" errors into ``StorageUnavailable``."""
    try:
        yield
    except exc.TimeoutError as error:  # every pooled connection busy for pool_timeout
        raise StorageUnavailable(f"database busy: {error}") from error
    except exc.DBAPIError as error:
        if _is_unavailable(error):
            raise StorageUnavailable(f"database unavailable: {error.orig or error}") from error
        raise


# --- the store ---------------------------------------------------------------------------------------


class TaskStore:
    """Tasks and API keys over one SQLAlchemy engine. Thread-safe: each call checks out a connection.

    ``migrate=True`` brings the schema to head first (and so connects at once: an unreachable
    database raises ``StorageUnavailable`` here). With ``migrate=False`` nothing connects until the
    first call, so a service can start while its database is still down and answer 503 meanwhile.
    """

    def __init__(
        self, database_url: str | URL, *, migrate: bool = True, pool_size: int = 5, max_overflow: int = 10
    ) -> None:
        self.engine: Engine = make_engine(database_url, pool_size=pool_size, max_overflow=max_overflow)
        if migrate:
            from imagegenx.storage.migrate import upgrade_connection

            try:
                with self._tx() as conn:
                    upgrade_connection(conn)
                self._fill_pool()
            except BaseException:
                self.engine.dispose()
                raise

    def _fill_pool(self) -> None:
        """SQLite: open the pool's connections now, so that the process's open files do not grow
        with load later (a soak test reads growth as a leak) and no request pays for the opening."""
        pool = self.engine.pool
        if self.engine.dialect.name != "sqlite" or not isinstance(pool, sa.QueuePool):
            return
        with contextlib.ExitStack() as held:
            for _ in range(pool.size()):
                held.enter_context(self.engine.connect())

    @classmethod
    def from_settings(cls, settings: StorageSettings, *, migrate: bool = True) -> TaskStore:
        return cls(
            settings.database_url,
            migrate=migrate,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )

    def close(self) -> None:
        """Close pooled connections. The store must not be used afterwards."""
        self.engine.dispose()

    def __enter__(self) -> TaskStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self, *, read_only: bool = False) -> Iterator[Connection]:
        with storage_errors(), self.engine.connect() as conn:
            if read_only:
                conn.execution_options(**{READ_ONLY: True})
            with conn.begin():
                yield conn

    # --- tasks ---------------------------------------------------------------------------------------

    def create(self, records: list[TaskRecord], *, then: Then = None) -> None:
        """Insert tasks in one transaction: a batch is stored whole or not at all.

        ``then(conn)`` runs inside that transaction before it commits (the embedded queue's rows for
        these tasks, so that a task and its queue entry exist together or not at all).
        Raises ``TaskExists`` (and stores nothing) when an id is taken.
        """
        if not records:
            return
        now = time.time()
        rows = [_task_row(r, now) for r in records]
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
        return None if row is None else _task_record(row)

    def get_many(self, task_ids: Iterable[str]) -> list[TaskRecord]:
        """The tasks among ``task_ids`` that exist, in no particular order (one query)."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return []
        with self._tx(read_only=True) as conn:
            rows = conn.execute(sa.select(tasks_table).where(_t.task_id.in_(ids))).mappings().all()
        return [_task_record(r) for r in rows]

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
        return [_task_record(r) for r in rows], total

    def active_count(self, user_id: str) -> int:
        """The user's queued + processing tasks (the per-key queue quota counts these)."""
        stmt = sa.select(sa.func.count()).where(_t.user_id == user_id, _t.status.in_(_ACTIVE))
        with self._tx(read_only=True) as conn:
            return conn.execute(stmt).scalar_one()

    def queued_total(self) -> int:
        """All queued tasks (the service refuses new work beyond ``max_queued_tasks``)."""
        stmt = sa.select(sa.func.count()).where(_t.status == TaskStatus.QUEUED.value)
        with self._tx(read_only=True) as conn:
            return conn.execute(stmt).scalar_one()

    def load(self, user_id: str) -> tuple[int, int]:
        """``(queued_total(), active_count(user_id))`` read in one transaction (each request asks)."""
        queued = sa.select(sa.func.count()).where(_t.status == TaskStatus.QUEUED.value)
        active = sa.select(sa.func.count()).where(_t.user_id == user_id, _t.status.in_(_ACTIVE))
        with self._tx(read_only=True) as conn:
            return conn.execute(queued).scalar_one(), conn.execute(active).scalar_one()

    def start(self, task_id: str, attempt: int) -> bool:
        """queued/processing → processing for ``attempt`` (progress restarts at 0; a redelivery takes
        over, so only that attempt can then succeed). False when the task is final or cancel was requested.
        """
        return self._changed(_start_stmt(task_id, attempt, time.time()))

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
                if conn.execute(_start_stmt(task_id, attempt, now)).rowcount == 1
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
        return self._changed(_succeed_stmt(Completion(task_id, attempt, results, metadata), time.time()))

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
                if item.start and conn.execute(_start_stmt(item.task_id, item.attempt, now)).rowcount != 1:
                    conn.execute(_canceled_stmt(item.task_id, now, requested_only=True))
                    continue
                if conn.execute(_succeed_stmt(item, now)).rowcount == 1:
                    done.add(item.task_id)
            if then is not None:
                then(conn)
        return done

    def fail(self, task_id: str, error: str, attempt: int | None = None) -> bool:
        """queued/processing → failed with ``error``; with ``attempt``, only for that attempt."""
        now = time.time()
        where = [_t.task_id == task_id, _t.status.in_(_ACTIVE)]
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
        return self._changed(_canceled_stmt(task_id, time.time()))

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
        where = [_t.status.in_(_FINAL), _t.created_at < cutoff]
        if limit is not None:
            ids = sa.select(_t.task_id).where(*where).order_by(_t.created_at).limit(limit)
            where.append(_t.task_id.in_(ids.scalar_subquery()))
        stmt = sa.delete(tasks_table).where(*where).returning(*tasks_table.c)
        with self._tx() as conn:
            rows = conn.execute(stmt).mappings().all()
        return sorted((_task_record(r) for r in rows), key=lambda r: (r.created_at, r.task_id))

    # --- API keys ------------------------------------------------------------------------------------

    def create_key(
        self, name: str, tier: Tier, rate_limit_per_s: float, queue_quota: int
    ) -> tuple[ApiKey, str]:
        """A new key and its secret ``igx_<key_id>_<32 random chars>``. The secret is shown this once:
        only its SHA-256 is stored.
        """
        key = ApiKey(
            key_id=secrets.token_hex(8),
            name=name,
            tier=Tier(tier),
            rate_limit_per_s=float(rate_limit_per_s),
            queue_quota=int(queue_quota),
            created_at=time.time(),
        )
        secret = f"{KEY_PREFIX}{key.key_id}_{secrets.token_urlsafe(24)}"  # 24 bytes → 32 chars
        row = {
            "key_id": key.key_id,
            "name": key.name,
            "secret_hash": _hash_secret(secret),
            "tier": key.tier.value,
            "rate_limit_per_s": key.rate_limit_per_s,
            "queue_quota": key.queue_quota,
            "created_at": key.created_at,
            "revoked_at": None,
        }
        with self._tx() as conn:
            conn.execute(sa.insert(api_keys_table), row)
        return key, secret

    def verify_key(self, secret: str) -> ApiKey | None:
        """The key a secret belongs to, or None if unknown or revoked. Looks up by hash."""
        if not secret.startswith(KEY_PREFIX):
            return None
        stmt = sa.select(api_keys_table).where(
            _k.secret_hash == _hash_secret(secret), _k.revoked_at.is_(None)
        )
        with self._tx(read_only=True) as conn:
            row = conn.execute(stmt).mappings().first()
        return None if row is None else _api_key(row)

    def list_keys(self) -> list[ApiKey]:
        """All keys, revoked ones included, oldest first."""
        stmt = sa.select(api_keys_table).order_by(_k.created_at, _k.key_id)
        with self._tx(read_only=True) as conn:
            return [_api_key(r) for r in conn.execute(stmt).mappings()]

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key; False if it does not exist or was revoked already."""
        now = time.time()
        stmt = (
            sa.update(api_keys_table)
            .where(_k.key_id == key_id, _k.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return self._changed(stmt)

    # --- helpers -------------------------------------------------------------------------------------

    def _changed(self, stmt: sa.Update) -> bool:
        with self._tx() as conn:
            return conn.execute(stmt).rowcount == 1


def _start_stmt(task_id: str, attempt: int, now: float) -> sa.Update:
    return (
        sa.update(tasks_table)
        .where(_t.task_id == task_id, _t.status.in_(_ACTIVE), sa.not_(_t.cancel_requested))
        .values(
            status=TaskStatus.PROCESSING.value, attempts=attempt, started_at=now, progress=0, updated_at=now
        )
    )


def _succeed_stmt(item: Completion, now: float) -> sa.Update:
    return (
        sa.update(tasks_table)
        .where(
            _t.task_id == item.task_id,
            _t.status == TaskStatus.PROCESSING.value,
            _t.attempts == item.attempt,
        )
        .values(
            status=TaskStatus.SUCCEEDED.value,
            progress=100,
            results=item.results,
            meta=item.metadata,
            error=None,
            finished_at=now,
            updated_at=now,
        )
    )


def _canceled_stmt(task_id: str, now: float, *, requested_only: bool = False) -> sa.Update:
    """processing → canceled; ``requested_only``: only if a cancel was requested."""
    where = [_t.task_id == task_id, _t.status == TaskStatus.PROCESSING.value]
    if requested_only:
        where.append(_t.cancel_requested)
    return (
        sa.update(tasks_table)
        .where(*where)
        .values(status=TaskStatus.CANCELED.value, finished_at=now, updated_at=now)
    )


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _task_row(r: TaskRecord, now: float) -> dict[str, Any]:
    return {
        "task_id": r.task_id,
        "user_id": r.user_id,
        "batch_id": r.batch_id,
        "task_type": r.task_type,
        "status": TaskStatus(r.status).value,
        "priority": int(r.priority),
        "params": r.params,
        "model": r.model,
        "width": r.width,
        "height": r.height,
        "style": r.style,
        "progress": r.progress,
        "attempts": r.attempts,
        "error": r.error,
        "created_at": r.created_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "updated_at": now,
        "results": r.results,
        "meta": r.metadata,
        "callback_url": r.callback_url,
        "cancel_requested": r.cancel_requested,
    }


def _task_record(row: Mapping[str, Any]) -> TaskRecord:
    return TaskRecord(
        task_id=row["task_id"],
        user_id=row["user_id"],
        task_type=row["task_type"],
        status=TaskStatus(row["status"]),
        priority=row["priority"],
        params=row["params"] or {},
        created_at=row["created_at"],
        batch_id=row["batch_id"],
        model=row["model"],
        width=row["width"],
        height=row["height"],
        style=row["style"],
        progress=row["progress"],
        attempts=row["attempts"],
        error=row["error"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        results=row["results"] or {},
        metadata=row["meta"] or {},
        callback_url=row["callback_url"],
        cancel_requested=bool(row["cancel_requested"]),
    )


def _api_key(row: Mapping[str, Any]) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"],
        name=row["name"],
        tier=Tier(row["tier"]),
        rate_limit_per_s=row["rate_limit_per_s"],
        queue_quota=row["queue_quota"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
