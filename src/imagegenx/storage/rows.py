"""Tasks between ``TaskRecord`` and the ``tasks`` table: row/record conversion, and the fenced
state-change statements that several ``TaskStore`` methods share (one statement, one transition).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from imagegenx.storage.schema import tasks_table
from imagegenx.types import TaskRecord, TaskStatus

__all__ = [
    "ACTIVE",
    "FINAL",
    "canceled_stmt",
    "start_stmt",
    "succeed_stmt",
    "task_record",
    "task_row",
]

ACTIVE = (TaskStatus.QUEUED.value, TaskStatus.PROCESSING.value)
FINAL = tuple(s.value for s in TaskStatus if s.final)

_t = tasks_table.c


def start_stmt(task_id: str, attempt: int, now: float) -> sa.Update:
    """queued/processing → processing for ``attempt``, unless a cancel was requested."""
    return (
        sa.update(tasks_table)
        .where(_t.task_id == task_id, _t.status.in_(ACTIVE), sa.not_(_t.cancel_requested))
        .values(
            status=TaskStatus.PROCESSING.value, attempts=attempt, started_at=now, progress=0, updated_at=now
        )
    )


def succeed_stmt(task_id: str, attempt: int, results: dict, metadata: dict, now: float) -> sa.Update:
    """processing → succeeded, only while ``attempt`` is the task's current attempt."""
    return (
        sa.update(tasks_table)
        .where(
            _t.task_id == task_id,
            _t.status == TaskStatus.PROCESSING.value,
            _t.attempts == attempt,
        )
        .values(
            status=TaskStatus.SUCCEEDED.value,
            progress=100,
            results=results,
            meta=metadata,
            error=None,
            finished_at=now,
            updated_at=now,
        )
    )


def canceled_stmt(task_id: str, now: float, *, requested_only: bool = False) -> sa.Update:
    """processing → canceled; ``requested_only``: only if a cancel was requested."""
    where = [_t.task_id == task_id, _t.status == TaskStatus.PROCESSING.value]
    if requested_only:
        where.append(_t.cancel_requested)
    return (
        sa.update(tasks_table)
        .where(*where)
        .values(status=TaskStatus.CANCELED.value, finished_at=now, updated_at=now)
    )


def task_row(r: TaskRecord, now: float) -> dict[str, Any]:
    """The ``tasks`` row that stores ``r`` (``updated_at`` is ``now``)."""
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


def task_record(row: Mapping[str, Any]) -> TaskRecord:
    """The ``TaskRecord`` a ``tasks`` row holds."""
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
