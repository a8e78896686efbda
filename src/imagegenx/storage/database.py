"""Reaching the database: URLs, configured engines, storage errors, and one short transaction per call.

Engines (``make_engine``):

* SQLite: ``check_same_thread=False``, WAL journal, ``busy_timeout=5000`` and foreign keys, set on each
  new connection. Every commit is fsynced (``synchronous=FULL``), so an accepted task survives a
  power cut; ``?synchronous=normal`` on the URL (``sqlite:///path.db?synchronous=normal``) skips the
  fsync per commit: a killed process still loses nothing, a power cut or OS crash can lose the last
  commits. Where an fsync takes tens of ms, FULL caps the service at a few tens of commits a second.
  SQLAlchemy emits ``BEGIN`` itself (the recipe in SQLAlchemy's SQLite docs), and a
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

``EngineStore`` is what every store builds on: the engine (the embedded queue runs its statements on
it too) and ``_tx``, which maps "cannot reach the database" to ``StorageUnavailable``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url

from imagegenx.storage.writegate import gate_for

__all__ = [
    "READ_ONLY",
    "EngineStore",
    "StorageUnavailable",
    "fill_sqlite_pool",
    "make_engine",
    "resolve_url",
    "storage_errors",
]

READ_ONLY = "imagegenx_read_only"  # execution option: plain deferred BEGIN on SQLite
SQLITE_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}  # the URL's ?synchronous= (module docs)


class StorageUnavailable(RuntimeError):
    """The database cannot be reached (or is locked beyond the busy timeout): answer 503 and retry."""


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
        synchronous = url.query.get("synchronous", "full").lower()
        if synchronous not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"synchronous={synchronous!r} in the SQLite URL: use full or normal")
        url = url.difference_update_query(["synchronous"])
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
        _configure_sqlite(engine, wal=not in_memory, synchronous=synchronous)
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


def _configure_sqlite(engine: Engine, *, wal: bool, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Hand transaction control to SQLAlchemy (see _on_begin), then set per-connection pragmas.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout = 5000")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {SQLITE_SYNCHRONOUS[synchronous]}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def fill_sqlite_pool(engine: Engine) -> None:
    """SQLite: open the pool's connections now, so that the process's open files do not grow
    with load later (a soak test reads growth as a leak) and no request pays for the opening."""
    pool = engine.pool
    if engine.dialect.name != "sqlite" or not isinstance(pool, sa.QueuePool):
        return
    with contextlib.ExitStack() as held:
        for _ in range(pool.size()):
            held.enter_context(engine.connect())


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


class EngineStore:
    """A store over one SQLAlchemy engine. Thread-safe: each call checks out a connection and runs
    one short transaction (``_tx``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine: Engine = engine
        sqlite = engine.dialect.name == "sqlite"
        self._gate = gate_for(engine.url.database) if sqlite else None

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Held around a write transaction: SQLite writers take turns (storage/writegate.py); the
        embedded queue is given this too, so its writes queue with the store's."""
        return self._gate.hold() if self._gate is not None else contextlib.nullcontext()

    def close(self) -> None:
        """Close pooled connections. The store must not be used afterwards."""
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self, *, read_only: bool = False) -> Iterator[Connection]:
        gate = contextlib.nullcontext() if read_only else self.writing()
        with storage_errors(), gate, self.engine.connect() as conn:
            if read_only:
                conn.execution_options(**{READ_ONLY: True})
            with conn.begin():
                yield conn

    def _changed(self, stmt: sa.Update) -> bool:
        """Run one conditional UPDATE; True if it changed exactly one row (this caller won)."""
        with self._tx() as conn:
            return conn.execute(stmt).rowcount == 1
