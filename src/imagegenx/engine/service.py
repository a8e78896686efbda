"""The service facade the HTTP API calls: accept tasks durably, answer questions about them, cancel.

No torch here: an API node can run this without a GPU. Accepting a task means, in order,
input images into the blob store, the task row(s) into the database, the job(s) into the queue;
a crash between steps leaves at worst a row that the expiry sweep finalises, never a lost or
duplicated task. On the embedded queue the rows and the queue entries are one transaction, shared
by the requests that arrive together (``engine.groupcommit``), so neither exists without the other.
Results are produced by ``engine.worker.ServiceWorker``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

from opentelemetry import trace

from imagegenx.config import Settings
from imagegenx.engine.events import TaskEvents
from imagegenx.engine.groupcommit import GroupCommit
from imagegenx.engine.validation import validate_job
from imagegenx.postprocess.chain import PostprocessSpec
from imagegenx.queue.base import JobQueue, JoinableQueue
from imagegenx.storage.blobs import BlobStore
from imagegenx.storage.database import StorageUnavailable
from imagegenx.storage.tasks import Completion, TaskStore
from imagegenx.types import (
    ApiKey,
    ControlRef,
    JobSpec,
    LoraRef,
    Priority,
    SchedulerName,
    Task,
    TaskRecord,
    TaskStatus,
    Tier,
    UserError,
)

log = logging.getLogger("imagegenx.service")
tracer = trace.get_tracer("imagegenx.service")  # a no-op unless an exporter is configured
TIER_MAX_SIDE = {Tier.FREE: 1024, Tier.PAID: 2048}
ANONYMOUS = ApiKey("anonymous", "anonymous", Tier.FREE, rate_limit_per_s=30, queue_quota=100, created_at=0)


class QuotaExceeded(UserError):
    """Too many tasks of this key in flight (HTTP 429)."""


class ServiceBusy(RuntimeError):
    """The queue is full (HTTP 503): nothing more is accepted until it drains."""


class Forbidden(UserError):
    """The key's tier does not allow this (HTTP 403)."""


@dataclass
class TaskInput:
    """One image to make, as the API parsed it. ``params`` holds JobSpec's fields by name."""

    params: dict[str, Any]
    priority: int = int(Priority.P2)
    callback_url: str | None = None
    style: str | None = None
    init_image: bytes | None = None
    mask_image: bytes | None = None
    output_format: str = "webp"
    # ControlNet images, in the order of params["controls"] (their model and strength live there)
    control_images: list[bytes] = field(default_factory=list)


@dataclass
class Service:
    settings: Settings
    store: TaskStore
    queue: JobQueue
    blobs: BlobStore
    events: TaskEvents = field(default_factory=TaskEvents)
    webhooks: Any = None  # api.webhooks.WebhookSender, set by the app factory
    # Called with a task id whose running job must stop: the cancel bus's publish where there is one
    # (build_service), else the in-process worker's cancel.
    on_cancel: Callable[[str], None] | None = None
    cancel_bus: Any = None  # queue.cancel.CancelBus; workers subscribe to it
    avg_task_s: float = 1.0  # moving average, fed by the worker, for estimated times
    _accepting: GroupCommit = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._accepting = GroupCommit(self._accept)

    def close(self) -> None:
        """Close what this service holds: webhook deliveries (flushed), queue and bus connections, store."""
        if self.webhooks is not None:
            self.webhooks.close()
        for backend in (self.cancel_bus, self.queue):
            close = getattr(backend, "close", None)
            if close is not None:
                close()
        self.store.close()

    # Accepting work -----------------------------------------------------------------------------

    def submit(
        self, user: ApiKey, inputs: list[TaskInput], *, batch_id: str | None = None
    ) -> list[TaskRecord]:
        """Validate everything first, then write inputs, rows and queue entries."""
        # 1. Limits: queue capacity and wait, the key's quota, the key's tier.
        load = self.store.load(user.key_id)
        if load.queued + len(inputs) > self.settings.service.max_queued_tasks:
            raise ServiceBusy("the queue is full; try again shortly")
        self._check_queue_wait(load.oldest_queued_at)
        if load.active + len(inputs) > user.queue_quota:
            raise QuotaExceeded(f"this key may have at most {user.queue_quota} tasks queued or running")
        records, jobs = [], []
        now = time.time()
        for item in inputs:
            task_id = uuid.uuid4().hex
            job = job_from_params(task_id, item.params, item.init_image, item.mask_image, item.control_images)
            self._check_tier(user, job, item.params)
            validate_job(job, self.settings.engine)
            jobs.append(job)
            records.append(
                TaskRecord(
                    task_id=task_id,
                    user_id=user.key_id,
                    task_type=str(job.task),
                    status=TaskStatus.QUEUED,
                    priority=item.priority,
                    params=item.params | {"format": item.output_format},
                    created_at=now,
                    batch_id=batch_id,
                    model=job.model,
                    width=job.width,
                    height=job.height,
                    style=item.style,
                    callback_url=item.callback_url,
                )
            )
        # 2. Inputs, then rows, then queue entries.
        for item, record in zip(inputs, records, strict=True):
            if item.init_image is not None:
                self.blobs.put(input_key(record.task_id, "image"), item.init_image)
            if item.mask_image is not None:
                self.blobs.put(input_key(record.task_id, "mask"), item.mask_image)
            for index, control in enumerate(item.control_images):
                self.blobs.put(input_key(record.task_id, f"control{index}"), control)
        entries = [(r.task_id, r.priority, batch_key_text(job)) for r, job in zip(records, jobs, strict=True)]
        with tracer.start_as_current_span("queue", attributes={"tasks": len(records)}):
            if self.joint_queue() is not None:  # concurrent requests share one commit (GroupCommit)
                self._accepting.run(_Accept(records, entries))
            else:
                self.store.create(records)
                for entry in entries:
                    self.queue.submit(*entry)
        return records

    def _accept(self, batch: list[_Accept]) -> None:
        """The rows and queue entries of several requests in one transaction: each request's rows
        and entries exist together or not at all, and one fsync serves them all."""
        joint = cast(JoinableQueue, self.queue)  # submit() checked joint_queue()
        records = [r for item in batch for r in item.records]
        entries = [e for item in batch for e in item.entries]
        self.store.create(records, then=lambda conn: joint.submit_many(entries, conn=conn))

    def joint_queue(self) -> JoinableQueue | None:
        """The queue when its rows live in the task database (the embedded queue on the store's
        engine), so that its writes can share the store's transactions; else None (JetStream)."""
        queue = self.queue
        if isinstance(queue, JoinableQueue) and queue.engine is self.store.engine:
            return queue
        return None

    def complete(self, owner: str, completions: list[Completion]) -> set[str]:
        """Commit finished attempts and acknowledge their leases; returns the ids that succeeded.

        On the embedded queue the rows and the acks are one transaction (one commit for a whole
        group of images). Elsewhere the rows commit first, then each lease is acked: a crash between
        leaves leases that come back, find the rows final, and are simply acked.
        """
        ids = [c.task_id for c in completions]
        joint = self.joint_queue()
        if joint is not None:
            return self.store.succeed_many(
                completions, then=lambda conn: joint.ack_many(owner, ids, conn=conn)
            )
        done = self.store.succeed_many(completions)
        for task_id in ids:
            self.queue.ack(owner, task_id)
        return done

    def _check_queue_wait(self, oldest_queued_at: float | None) -> None:
        """Refuse new work while the oldest queued task has waited longer than ``max_queue_wait_s``:
        the workers are not keeping up, and a task accepted now would wait at least as long. Under
        overload the service then accepts what it can finish in time and says so for the rest,
        instead of letting every task's wait grow until it expires."""
        limit = self.settings.service.max_queue_wait_s
        if limit <= 0 or oldest_queued_at is None:
            return
        behind = time.time() - oldest_queued_at
        if behind > limit:
            raise ServiceBusy(
                f"the queue is {behind:.1f} s behind (the limit is {limit:g} s): the workers are at "
                "capacity; try again shortly"
            )

    def _check_tier(self, user: ApiKey, job: JobSpec, params: dict) -> None:
        side = TIER_MAX_SIDE[user.tier]
        if job.width > side or job.height > side:
            raise Forbidden(
                f"the {user.tier} tier allows up to {side}x{side}; {job.width}x{job.height} asked"
            )
        post = params.get("postprocess") or {}
        if post.get("upscale", 1) == 4 and user.tier is not Tier.PAID:
            raise Forbidden("4x upscale is a paid-tier feature")
        # The tier's NSFW gate: QC scores every image and withholds those above the limit.
        limit = self.settings.service.nsfw_max_by_tier.get(str(user.tier))
        if limit is not None:
            params["postprocess"] = post = post | {"qc": True, "nsfw_max": limit}
        PostprocessSpec.from_params(params)  # a chain that cannot run is refused now, not after generating

    # Questions ----------------------------------------------------------------------------------

    def get(self, task_id: str, user: ApiKey) -> TaskRecord:
        record = self.store.get(task_id, user.key_id)
        if record is None:
            raise KeyError(task_id)
        return record

    def estimated_seconds(self, record: TaskRecord) -> float:
        if record.status.final:
            return 0.0
        if record.status is TaskStatus.PROCESSING:
            return round(self.avg_task_s * (100 - record.progress) / 100, 2)
        return round(
            self.avg_task_s * (1 + self.store.queued_total() / max(1, self.settings.engine.max_batch)), 2
        )

    # Cancel -------------------------------------------------------------------------------------

    def cancel(self, task_id: str, user: ApiKey) -> TaskStatus:
        status = self.store.cancel(task_id, user.key_id)
        if status is None:
            raise KeyError(task_id)
        if status is TaskStatus.CANCELED:
            self.queue.remove(task_id)
            self.notify(task_id)
        elif status is TaskStatus.PROCESSING and self.on_cancel is not None:
            self.on_cancel(task_id)
        return status

    def expire_stale(self) -> list[str]:
        """Queued tasks older than the limit become ``expired`` and leave the queue."""
        expired = self.store.expire_queued(self.settings.service.queued_task_ttl_s)
        for task_id in expired:
            self.queue.remove(task_id)
            if self.on_cancel is not None:  # it may wait in this process's engine
                self.on_cancel(task_id)
            self.notify(task_id)
        return expired

    # Outcomes -----------------------------------------------------------------------------------

    def notify(self, task_id: str) -> None:
        """A task changed status: tell SSE subscribers and, when final, its webhook."""
        self.notify_many([task_id])

    def notify_many(self, task_ids: list[str]) -> None:
        """``notify`` for several tasks, read in one query."""
        for record in self.store.get_many(task_ids):
            self.events.publish(record.task_id, {"status": str(record.status), "progress": record.progress})
            if record.status.final and record.callback_url and self.webhooks is not None:
                self.webhooks.send(record.callback_url, f"task.{record.status}", task_summary(record))


@dataclass
class _Accept:
    """One request's task rows and queue entries, waiting for a shared commit."""

    records: list[TaskRecord]
    entries: list[tuple[str, int, str]]


class StoreEventRelay:
    """Progress and completion of tasks that run in other processes, for this process's SSE clients.

    An API node has no engine: the workers write status and progress (every 5%) to the task database,
    and this thread reads the rows somebody is subscribed to, one query per tick, and publishes what
    changed. The database is the source of truth anyway, so no event bus is needed for correctness.
    """

    def __init__(self, store: TaskStore, events: TaskEvents, *, interval_s: float = 0.5) -> None:
        self.store = store
        self.events = events
        self.interval_s = interval_s
        self._seen: dict[str, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imagegenx-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def poll(self) -> int:
        """Publish the changes since the last poll; returns how many events went out."""
        watched = self.events.watched()
        self._seen = {task_id: self._seen[task_id] for task_id in watched if task_id in self._seen}
        sent = 0
        for record in self.store.get_many(watched):
            state = (str(record.status), record.progress)
            if self._seen.get(record.task_id) != state:
                self._seen[record.task_id] = state
                self.events.publish(record.task_id, {"status": state[0], "progress": state[1]})
                sent += 1
        return sent

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except StorageUnavailable as exc:  # SSE clients fall back to asking the database
                log.warning("relay: storage unavailable: %s", exc)


def input_key(task_id: str, name: str) -> str:
    return f"inputs/{task_id}/{name}"


def result_key(task_id: str, version: str, extension: str) -> str:
    return f"results/{task_id}/{version}{extension}"


def batch_key_text(job: JobSpec) -> str:
    key = job.batch_key
    loras = ",".join(f"{lora.name}:{lora.weight:g}" for lora in key.loras)
    controls = ",".join(key.controls)
    return f"{key.model}|{key.width}x{key.height}|{key.task}|{loras}|{controls}"


def job_from_params(
    task_id: str,
    params: dict[str, Any],
    init_image: bytes | None,
    mask_image: bytes | None,
    control_images: list[bytes] | None = None,
) -> JobSpec:
    """The JobSpec a task's stored parameters describe (pure: no torch, no I/O)."""
    known = {f for f in JobSpec.__dataclass_fields__} - {
        "init_image",
        "mask_image",
        "job_id",
        "loras",
        "controls",
    }
    values = {k: v for k, v in params.items() if k in known}
    try:
        job = JobSpec(**values)
        return replace(
            job,
            job_id=task_id,
            task=Task(job.task),
            scheduler=SchedulerName(job.scheduler),
            priority=Priority(int(job.priority)),
            loras=tuple(
                LoraRef(str(lora["name"]), float(lora.get("weight", 1.0))) for lora in params.get("loras", [])
            ),
            init_image=init_image,
            mask_image=mask_image,
            controls=tuple(
                ControlRef(str(control["model"]), image, float(control.get("strength", 1.0)))
                for control, image in zip(params.get("controls", []), control_images or [], strict=True)
            ),
        )
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"invalid task parameters: {exc}") from None


def task_summary(record: TaskRecord) -> dict[str, Any]:
    """What a webhook or a list entry says about a task (no secrets, no image bytes)."""
    data = asdict(record)
    data["status"] = str(record.status)
    data.pop("callback_url", None)
    return data
