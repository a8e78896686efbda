"""The task store's tables: ``tasks`` and ``api_keys``, as SQLAlchemy Core metadata.

Mirrors migrations/versions/ (0001 and 0002; a test compares the two). ``queue_jobs`` is the queue room's
table and deliberately absent here.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["api_keys_table", "metadata", "tasks_table"]

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
    sa.Index(
        "ix_tasks_user_id_status", "user_id", "status"
    ),  # 0003: each request counts its key's active tasks
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
