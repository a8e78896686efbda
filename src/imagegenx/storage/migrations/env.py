"""Alembic environment for imagegenx's one migration tree (tasks, api_keys, queue_jobs).

``imagegenx.storage.migrate.upgrade`` runs it programmatically and hands over an open connection in
``config.attributes["connection"]`` (inside its own transaction, so concurrent starters serialize).
Run by the ``alembic`` command line instead, it builds an engine from ``sqlalchemy.url`` the way the
task store does (``postgresql://`` means psycopg 3).
"""

from __future__ import annotations

from alembic import context

from imagegenx.storage.database import make_engine

config = context.config


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=None, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (shared := config.attributes.get("connection")) is not None:
    _run(shared)
else:
    engine = make_engine(config.get_main_option("sqlalchemy.url"), pooled=False)
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()
