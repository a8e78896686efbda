"""Portrait jobs as service tasks: one task, many stages (engine/portrait.py), durable like any task.

Accepting: the selfies go to the blob store (``inputs/<task>/selfie<k>``), the task row records the
portrait's parameters, one queue entry carries it. Running (``run_portrait_task``, on its own thread
in the worker): the stages report progress to the task row and to SSE subscribers (with the stage's
name); the results are the shortlisted images (``rank1`` ... in shortlist order; ``original`` is
the best), ``report`` (every draft's scores, JSON) and ``contact_sheet``, written before the row
says succeeded. A cancel request stops the run at the next stage boundary or finished draft.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from imagegenx.engine.portrait import STAGES, PortraitSpec, run_portrait
from imagegenx.engine.service import Forbidden, QuotaExceeded, Service, ServiceBusy, input_key
from imagegenx.types import ApiKey, TaskRecord, TaskStatus, Tier, UserError

PORTRAIT_FIELDS = set(PortraitSpec.__dataclass_fields__) - {"loras", "nsfw_max"}


class PortraitCanceled(Exception):
    """The task's cancel was requested: stop between stages."""


class WorkerStopping(Exception):
    """The worker is shutting down: stop between stages and leave the lease, so the task runs again."""


def submit_portrait(
    service: Service, user: ApiKey, selfies: list[tuple[str, bytes]], params: dict[str, Any], priority: int
) -> TaskRecord:
    """Validate, store the selfies, record the task, queue it."""
    spec = portrait_spec(params)  # a bad parameter is refused now, not after queueing
    if not 1 <= len(selfies) <= 3:
        raise UserError(f"give 1-3 selfies, not {len(selfies)}")
    if spec.upscale == 4 and user.tier is not Tier.PAID:
        raise Forbidden("4x upscale is a paid-tier feature: ask for upscale 1 or 2")
    if service.store.queued_total() + 1 > service.settings.service.max_queued_tasks:
        raise ServiceBusy("the queue is full; try again shortly")
    if service.store.active_count(user.key_id) + 1 > user.queue_quota:
        raise QuotaExceeded(f"this key may have at most {user.queue_quota} tasks queued or running")
    task_id = uuid.uuid4().hex
    model = spec.model or service.settings.models.default_model
    record = TaskRecord(
        task_id=task_id,
        user_id=user.key_id,
        task_type="portrait",
        status=TaskStatus.QUEUED,
        priority=priority,
        params=params | {"selfies": [name for name, _ in selfies]},
        created_at=time.time(),
        model=model,
        width=spec.width or 0,
        height=spec.height or 0,
    )
    for index, (_, data) in enumerate(selfies):
        service.blobs.put(input_key(task_id, f"selfie{index}"), data)
    service.store.create([record])
    service.queue.submit(task_id, priority, f"portrait|{model}")
    return record


def portrait_spec(params: dict[str, Any]) -> PortraitSpec:
    try:
        return PortraitSpec(**{k: v for k, v in params.items() if k in PORTRAIT_FIELDS})
    except TypeError as exc:
        raise UserError(f"invalid portrait parameters: {exc}") from None


def run_portrait_task(
    service: Service,
    engine: Any,
    record: TaskRecord,
    publish: Callable[[dict], None],
    stopping: Callable[[], bool] = lambda: False,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Run the portrait; returns (results: version → blob key, metadata) once every blob is written."""
    task_id = record.task_id
    selfies = [
        (name, service.blobs.get(input_key(task_id, f"selfie{index}")))
        for index, name in enumerate(record.params["selfies"])
    ]
    last = {"progress": -100}

    def progress(stage: str, done: int, total: int) -> None:
        if stopping():
            raise WorkerStopping
        current = service.store.get(task_id)
        if current is None or current.cancel_requested:
            raise PortraitCanceled
        # Each stage is an equal share of the bar; within a stage, its own fraction.
        share = (STAGES.index(stage) + (done / total if total else 1)) / len(STAGES)
        percent = min(99, int(100 * share))
        publish({"status": str(TaskStatus.PROCESSING), "progress": percent, "stage": stage})
        if percent - last["progress"] >= 5:
            last["progress"] = percent
            service.store.set_progress(task_id, percent)

    result = run_portrait(engine, selfies, portrait_spec(record.params), progress)
    results: dict[str, str] = {}
    for name, data in result.files.items():
        version = _version(name, result)
        if version is None:
            continue
        key = f"results/{task_id}/{name}"
        service.blobs.put(key, data)
        results[version] = key
    if "rank1" in results:
        results["original"] = results["rank1"]
    metadata = {
        "shortlist": result.report.get("shortlist", []),
        "timings_s": result.report.get("timings_s", {}),
        "warnings": result.warnings,
    }
    return results, metadata


def _version(name: str, result: Any) -> str | None:
    """The download version of an output file: rank<n> for the n-th shortlisted image."""
    if name == "report.json":
        return "report"
    if name.startswith("contact_sheet"):
        return "contact_sheet"
    if name.endswith(".json"):  # an image's own metadata: the report holds it too
        return None
    stem = name.split(".")[0]
    digits = "".join(ch for ch in stem.split("-")[0] if ch.isdigit())
    return f"rank{int(digits)}" if digits else None
