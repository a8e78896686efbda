"""The ImageGenX v1 routes that read and steer existing tasks: status, cancel, progress events (SSE),
result downloads (one file or a ZIP) and the key's history."""

from __future__ import annotations

import asyncio
import io
import json
import queue
import zipfile
from collections.abc import AsyncIterable
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from imagegenx.api.app import ErrorBody, NotFound, error_responses
from imagegenx.api.deps import ContextDep, KeyDep
from imagegenx.api.schemas import Envelope, Page, TaskView
from imagegenx.api.task_views import owned_record, task_view
from imagegenx.types import TaskStatus

router = APIRouter(prefix="/api/v1", tags=["imagegenx v1"], responses=error_responses(ErrorBody))
# An image task's results: the original and two thumbnails; a portrait task's also its ranked images
# ("rank1" ...), the report and the contact sheet.
VERSION_PATTERN = "^(original|512|256|report|contact_sheet|rank[0-9]{1,3})$"
MEDIA_TYPES = {
    ".webp": "image/webp",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".avif": "image/avif",
    ".json": "application/json",
}


@router.get(
    "/image/task/{task_id}",
    summary="A task's status, progress and result URLs",
    response_model=Envelope[TaskView],
)
def get_task(task_id: str, key: KeyDep, ctx: ContextDep, request: Request) -> Envelope[TaskView]:
    return Envelope(data=task_view(ctx, owned_record(ctx, task_id, key), str(request.base_url)))


@router.post(
    "/image/task/{task_id}/cancel",
    summary="Cancel a queued or running task",
    response_model=Envelope[TaskView],
)
def cancel_task(task_id: str, key: KeyDep, ctx: ContextDep, request: Request) -> Envelope[TaskView]:
    try:
        ctx.service.cancel(task_id, key)
    except KeyError:
        raise NotFound(f"no task {task_id!r} for this key") from None
    return Envelope(data=task_view(ctx, owned_record(ctx, task_id, key), str(request.base_url)))


@router.get(
    "/image/task/{task_id}/events",
    summary="Progress as Server-Sent Events",
    response_class=EventSourceResponse,
)
async def task_events(
    task_id: str, key: KeyDep, ctx: ContextDep, request: Request
) -> AsyncIterable[ServerSentEvent]:
    record = await run_in_threadpool(owned_record, ctx, task_id, key)
    subscription = ctx.service.events.subscribe(task_id)
    try:
        yield ServerSentEvent(
            event="status", data={"status": str(record.status), "progress": record.progress}
        )
        status = record.status
        while not status.final and not await request.is_disconnected():
            try:
                event = await asyncio.to_thread(subscription.get, True, 5.0)
            except queue.Empty:
                record = await run_in_threadpool(owned_record, ctx, task_id, key)  # missed events: ask the DB
                event = {"status": str(record.status), "progress": record.progress}
            status = TaskStatus(event["status"])
            yield ServerSentEvent(event="status", data=event)
    finally:
        ctx.service.events.unsubscribe(task_id, subscription)


@router.get(
    "/image/task/{task_id}/download",
    summary="One result image",
    response_class=Response,
    responses={307: {"description": "Redirect to a presigned S3 URL, valid 1 h (storage.s3_presign)"}},
)
def download(
    task_id: str,
    key: KeyDep,
    ctx: ContextDep,
    version: Annotated[str, Query(pattern=VERSION_PATTERN)] = "original",
) -> Response:
    record = owned_record(ctx, task_id, key)
    blob_key = record.results.get(version)
    if blob_key is None:
        raise NotFound(f"task {task_id} has no {version} result (status {record.status})")
    signed = ctx.service.blobs.presigned_url(blob_key)  # with storage.s3_presign: S3 serves the bytes
    if signed is not None:
        return RedirectResponse(signed, status_code=307)
    extension = blob_key[blob_key.rfind(".") :]
    filename = f"{task_id}-{version}{extension}"
    return Response(
        ctx.service.blobs.get(blob_key),
        media_type=MEDIA_TYPES.get(extension, "application/octet-stream"),
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/image/download.zip", summary="Several results as one ZIP", response_class=Response)
def download_zip(
    key: KeyDep,
    ctx: ContextDep,
    task_ids: Annotated[str | None, Query(description="Comma-separated task ids", max_length=4000)] = None,
    batch_id: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    if batch_id:
        records = [r for r in ctx.service.store.query(key.key_id, limit=1000)[0] if r.batch_id == batch_id]
    else:
        ids = [t for t in (task_ids or "").split(",") if t][:200]
        records = [owned_record(ctx, t, key) for t in ids]
    done = [r for r in records if "original" in r.results]
    if not done:
        raise NotFound("none of these tasks has a finished image")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for r in done:
            blob_key = r.results["original"]
            archive.writestr(f"{r.task_id}{blob_key[blob_key.rfind('.') :]}", ctx.service.blobs.get(blob_key))
            archive.writestr(f"{r.task_id}.json", json.dumps(r.metadata, indent=2))
    return Response(
        buf.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": 'attachment; filename="images.zip"'},
    )


@router.get("/image/tasks", summary="History of this key's tasks (90 days)", response_model=Envelope[Page])
def history(
    key: KeyDep,
    ctx: ContextDep,
    request: Request,
    status: Annotated[TaskStatus | None, Query()] = None,
    style: Annotated[str | None, Query(max_length=64)] = None,
    resolution: Annotated[str | None, Query(pattern=r"^\d{2,4}x\d{2,4}$")] = None,
    since: Annotated[float | None, Query(ge=0, description="Unix seconds")] = None,
    until: Annotated[float | None, Query(ge=0)] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Envelope[Page]:
    width = height = None
    if resolution:
        width, height = (int(v) for v in resolution.split("x"))
    items, total = ctx.service.store.query(
        key.key_id,
        status=status,
        style=style,
        width=width,
        height=height,
        since=since,
        until=until,
        limit=page_size,
        offset=(page - 1) * page_size,
    )
    views = [task_view(ctx, r, str(request.base_url)) for r in items]
    return Envelope(data=Page(items=views, total=total, page=page, page_size=page_size))
