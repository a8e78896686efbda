"""Schema migrations: run the package's Alembic tree to head, programmatically (no alembic.ini).

One tree (``storage/migrations``) serves the whole database: the task store's tables and the embedded
queue's ``queue_jobs``. ``upgrade`` is idempotent and safe when several processes start at once: the
migration runs in one transaction that takes a lock first (``BEGIN IMMEDIATE`` on SQLite, an advisory
lock on PostgreSQL), so the second process waits, then finds the schema at head and does nothing.

Alembic is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import threading
from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection

HEAD = "head"
# pg_advisory_xact_lock key: any constant shared by every imagegenx process ("igx-migr" in ASCII).
_PG_LOCK_KEY = 0x6967782D6D696772
# Alembic keeps the running environment in module globals (alembic.context, alembic.op): one migration
# at a time per process, even for different databases.
_ALEMBIC_LOCK = threading.Lock()
MIGRATION_WAIT_MS = 120_000  # how long a migration waits for SQLite's write lock


def script_location() -> str:
    """The folder holding ``env.py`` and ``versions/``, found through the installed package."""
    return str(files("imagegenx.storage").joinpath("migrations"))


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic ``Config`` for this tree, e.g. for ``alembic.command.revision`` during development."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", script_location())
    cfg.set_main_option("path_separator", "os")
    if database_url is not None:
        # ConfigParser interpolation: a literal % (URL-encoded passwords) must be doubled.
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade_connection(connection: Connection) -> None:
    """Migrate to head on an open connection, inside its current transaction (the caller commits)."""
    from alembic import command

    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
    cfg = alembic_config()
    cfg.attributes["connection"] = connection  # env.py migrates on it
    with _ALEMBIC_LOCK:  # taken after the database lock above, so no lock-order inversion
        command.upgrade(cfg, HEAD)


def upgrade(database_url: str) -> None:
    """Bring the database at ``database_url`` to the newest schema; a no-op when it is there already.

    Works for ``sqlite:///path`` and ``postgresql://...`` (psycopg 3) alike. Raises
    ``imagegenx.storage.database.StorageUnavailable`` when the database cannot be reached.
    """
    from imagegenx.storage.database import make_engine, storage_errors

    engine = make_engine(database_url, pooled=False)
    try:
        with storage_errors(), engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Waiting for another process's (or thread's) migration may take longer than the
                # 5 s a request waits for the write lock; set on the driver's connection, outside
                # any transaction, before BEGIN IMMEDIATE asks for the lock.
                connection.connection.driver_connection.execute(f"PRAGMA busy_timeout = {MIGRATION_WAIT_MS}")
            with connection.begin():
                upgrade_connection(connection)
    finally:
        engine.dispose()


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()
