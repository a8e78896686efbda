"""Index tasks by (user_id, status).

Revision ID: 0003_tasks_user_status
Revises: 0002_tasks_created_at
Create Date: 2026-11-30

Every accepted request counts its key's unfinished tasks (the queue quota, ``TaskStore.load``). With
only (user_id, created_at), that count read every task the key ever made: 2.25 ms per request with
10,000 tasks in one key's history, growing with it (a paid key keeps 90 days). With (user_id, status)
it reads the unfinished ones only: 0.40 ms.
"""

from __future__ import annotations

from alembic import op

revision = "0003_tasks_user_status"
down_revision = "0002_tasks_created_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_user_id_status", "tasks", ["user_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_tasks_user_id_status", table_name="tasks")
