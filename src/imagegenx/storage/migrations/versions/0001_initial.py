"""Initial schema: tasks, api_keys and queue_jobs.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-22

Times are float unix seconds (double precision) everywhere. ``queue_jobs`` belongs to the queue room;
it lives in this tree so one ``upgrade`` prepares the whole database. Its column names and types are a
contract with the embedded queue backend: change them only together with it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasks",
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
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    # The seed's (task_id, user_id) composite index: "my task" lookups touch only the index.
    op.create_index("ix_tasks_task_id_user_id", "tasks", ["task_id", "user_id"], unique=True)
    op.create_index("ix_tasks_user_id_created_at", "tasks", ["user_id", "created_at"])
    op.create_index("ix_tasks_status_created_at", "tasks", ["status", "created_at"])
    op.create_index("ix_tasks_batch_id", "tasks", ["batch_id"])

    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("rate_limit_per_s", sa.Double(), nullable=False),
        sa.Column("queue_quota", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("revoked_at", sa.Double(), nullable=True),
    )
    op.create_index("ix_api_keys_secret_hash", "api_keys", ["secret_hash"], unique=True)

    op.create_table(
        "queue_jobs",
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("lane", sa.Integer(), nullable=False),
        sa.Column("batch_key", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),  # 'ready' | 'leased'
        sa.Column("available_at", sa.Double(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.Double(), nullable=True),
        sa.Column("deliveries", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("enqueued_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_queue_jobs_state_lane_available_at", "queue_jobs", ["state", "lane", "available_at"])


def downgrade() -> None:
    op.drop_table("queue_jobs")
    op.drop_table("api_keys")
    op.drop_table("tasks")
