"""Submit-then-wait for the synchronous compatible APIs (OpenAI Images, AUTOMATIC1111).

A request's images are submitted as one batch; the route then waits for their final records without
holding a thread (task events, with the database as the fallback) and answers with the images.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
import uuid

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from imagegenx.api.app import AppContext
from imagegenx.api.shaped_errors import TaskFailure
from imagegenx.api.task_views import owned_record
from imagegenx.engine.service import TaskInput
from imagegenx.types import ApiKey, TaskRecord, TaskStatus

POLL_S = 0.1  # how often a waiting request looks at its task events
DB_CHECK_S = 1.0  # how often it asks the database anyway (events are per process and may be missed)
MAX_RUN_S = 600.0  # beyond the queue's own expiry, how long a request waits for its images


def submit(ctx: AppContext, key: ApiKey, items: list[TaskInput]) -> list[TaskRecord]:
    """Submit one request's images as one batch (the A1111 progress route groups by it)."""
    return ctx.service.submit(key, items, batch_id=uuid.uuid4().hex)


def _final_records(ctx: AppContext, key: ApiKey, task_ids: list[str]) -> dict[str, TaskRecord]:
    records = (owned_record(ctx, task_id, key) for task_id in task_ids)
    return {r.task_id: r for r in records if r.status.final}


def cancel_tasks(ctx: AppContext, key: ApiKey, task_ids: list[str]) -> None:
    for task_id in task_ids:
        with contextlib.suppress(KeyError):  # gone meanwhile (history purge)
            ctx.service.cancel(task_id, key)


async def wait_for_tasks(
    request: Request, ctx: AppContext, key: ApiKey, task_ids: list[str]
) -> list[TaskRecord]:
    """The tasks' final records, in order. Holds no thread while waiting.

    Gives up (cancelling what is left) when the client goes away or after the queue's expiry plus
    ``MAX_RUN_S``: then 504.
    """
    events = ctx.service.events
    subscriptions = {task_id: events.subscribe(task_id) for task_id in task_ids}
    final: dict[str, TaskRecord] = {}
    deadline = time.monotonic() + ctx.settings.service.queued_task_ttl_s + MAX_RUN_S
    next_check = 0.0  # subscribed first, then read: nothing that ends in between is missed
    try:
        while True:
            heard_final = False
            for task_id, subscription in subscriptions.items():
                while task_id not in final:
                    try:
                        event = subscription.get_nowait()
                    except queue.Empty:
                        break
                    heard_final |= TaskStatus(event["status"]).final
            now = time.monotonic()
            if heard_final or now >= next_check:
                pending = [t for t in task_ids if t not in final]
                final |= await run_in_threadpool(_final_records, ctx, key, pending)
                if len(final) == len(task_ids):
                    return [final[t] for t in task_ids]
                next_check = now + DB_CHECK_S
                gone = await request.is_disconnected()
                if gone or now > deadline:
                    await run_in_threadpool(cancel_tasks, ctx, key, [t for t in task_ids if t not in final])
                    if gone:
                        raise TaskFailure(499, "the client closed the connection; its tasks were canceled")
                    raise TaskFailure(504, "the images were not ready in time; their tasks were canceled")
            await asyncio.sleep(POLL_S)
    finally:
        for task_id, subscription in subscriptions.items():
            events.unsubscribe(task_id, subscription)


def result_bytes(ctx: AppContext, record: TaskRecord) -> bytes:
    return ctx.service.blobs.get(record.results["original"])


def failure(record: TaskRecord) -> TaskFailure:
    """What to answer when ``record`` did not succeed."""
    if record.status is TaskStatus.EXPIRED:
        return TaskFailure(503, "the server was too busy: the task expired in the queue; retry later")
    if record.status is TaskStatus.CANCELED:
        return TaskFailure(500, "the task was canceled")
    return TaskFailure(500, f"image generation failed: {record.error or 'unknown error'}")
