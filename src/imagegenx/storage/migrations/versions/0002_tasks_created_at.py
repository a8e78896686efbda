"""Index tasks by creation time alone.

Revision ID: 0002_tasks_created_at
Revises: 0001_initial
Create Date: 2026-11-29

The seed keys task metadata by creation time (daily partitions) beside the (task_id, user_id) index of
0001. Per-user history already has (user_id, created_at); what scans every user by time (the 90-day
history purge, oldest first in bounded batches; time-range reports) needs created_at on its own, or
PostgreSQL sorts the whole final-task set for each purge batch.
"""

from __future__ import annotations

from alembic import op

revision = "0002_tasks_created_at"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_created_at", "tasks", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_created_at", table_name="tasks")
