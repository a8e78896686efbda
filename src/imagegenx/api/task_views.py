"""A stored task as the API shows it: status, progress, timings and its results' download URLs, read
only through the caller's key. Shared by the v1 task routes, the OpenAI routes and synchronous waits."""

from __future__ import annotations

from imagegenx.api.app import AppContext, NotFound
from imagegenx.api.schemas import TaskView
from imagegenx.types import ApiKey, TaskRecord


def task_view(ctx: AppContext, record: TaskRecord, base_url: str) -> TaskView:
    base = (ctx.settings.service.public_url or base_url).rstrip("/")
    urls = {
        version: f"{base}/api/v1/image/task/{record.task_id}/download?version={version}"
        for version in record.results
    }
    return TaskView(
        task_id=record.task_id,
        status=str(record.status),
        progress=record.progress,
        estimated_seconds=ctx.service.estimated_seconds(record),
        task_type=record.task_type,
        model=record.model,
        width=record.width,
        height=record.height,
        style=record.style,
        priority=record.priority,
        attempts=record.attempts,
        error=record.error,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        batch_id=record.batch_id,
        urls=urls,
        params=record.params,
        metadata=record.metadata,
    )


def owned_record(ctx: AppContext, task_id: str, key: ApiKey) -> TaskRecord:
    try:
        return ctx.service.get(task_id, key)
    except KeyError:
        raise NotFound(f"no task {task_id!r} for this key") from None
