"""Outcomes of finished engine jobs, on the post thread: post-process, store, commit, acknowledge.

The loop hands over every job the engine finished since its last turn as one group. The group's
images are post-processed together where their chains agree, their blobs are written in parallel
(encoding releases the GIL), and the successes of a chain group are committed with their acks in
one transaction (``Service.complete``). Cancels and failures are recorded one by one as they show.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import CancelledError, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from opentelemetry import trace

from imagegenx.engine.engine import Engine, JobFailed
from imagegenx.engine.held_tasks import HeldTasks, InFlight
from imagegenx.engine.result_images import store_images
from imagegenx.engine.service import Service
from imagegenx.postprocess.chain import PostprocessSpec, apply_chain
from imagegenx.postprocess.encode import image_metadata
from imagegenx.storage.blobs import BlobWriteError
from imagegenx.storage.tasks import Completion
from imagegenx.types import GeneratedImage, TaskRecord, UserError

__all__ = ["OutcomeWriter"]

log = logging.getLogger("imagegenx.worker")
tracer = trace.get_tracer("imagegenx.worker")  # a no-op unless an exporter is configured


@dataclass
class _Stored:
    """An image whose blobs are written and whose row waits for its group's commit."""

    completion: Completion
    image: GeneratedImage


class OutcomeWriter:
    def __init__(self, service: Service, engine: Engine, held: HeldTasks) -> None:
        self.service = service
        self.engine = engine
        self._held = held
        # One post thread, so the loop keeps leasing and heartbeating while a group is stored.
        self._post = ThreadPoolExecutor(1, thread_name_prefix="imagegenx-post")
        # Storing an outcome is mostly encoding (WebP of the image and two thumbnails: ~60 ms of CPU for
        # 512² here), which releases the GIL: the images of a group are stored in parallel.
        self._store = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="imagegenx-store")

    def submit(self, finished: list[InFlight]) -> None:
        """Hand a group of finished jobs (already counted as storing) to the post thread."""
        self._post.submit(self._complete_group, finished)

    def shutdown(self) -> None:
        """Let the groups handed over finish storing."""
        self._post.shutdown(wait=True)
        self._store.shutdown(wait=True)

    def _complete_group(self, entries: list[InFlight]) -> None:
        """Post-process the images together where their chains agree, then store each outcome."""
        try:
            groups: dict[PostprocessSpec, list[tuple[InFlight, TaskRecord, GeneratedImage]]] = {}
            records = {r.task_id: r for r in self.service.store.get_many([e.lease.task_id for e in entries])}
            for entry in entries:
                done = self._engine_outcome(entry, records.get(entry.lease.task_id))
                if done is not None:
                    record, image = done
                    groups.setdefault(PostprocessSpec.from_params(record.params), []).append(
                        (entry, record, image)
                    )
            for spec, members in groups.items():
                with tracer.start_as_current_span("postprocess", attributes={"tasks": len(members)}):
                    images = self._postprocess(spec, [image for _, _, image in members])
                stored = [
                    self._store.submit(self._store_outcome, entry, record, image)
                    for (entry, record, _), image in zip(members, images, strict=True)
                ]
                wait(stored)  # all of them, before an error below ends the group
                # An error leaves the job's lease: it comes back after expiry. The others commit.
                done = [f.result() for f in stored if f.exception() is None]
                self._commit([c for c in done if c is not None])
                for future in stored:
                    future.result()
        except Exception:  # the leases stay: the jobs come back after expiry
            log.exception("post-processing error")
        finally:
            for entry in entries:
                self._held.storing.discard(entry.lease.task_id)

    def _engine_outcome(
        self, job: InFlight, record: TaskRecord | None
    ) -> tuple[TaskRecord, GeneratedImage] | None:
        """The task's record and image, or None when the job was cancelled or failed (recorded)."""
        service, task_id, finish = self.service, job.lease.task_id, self._held.finish
        try:
            image = job.future.result()
        except CancelledError:
            service.store.mark_canceled(task_id)
            finish(task_id)
            return None
        except JobFailed as exc:
            service.store.fail(task_id, str(exc))
            finish(task_id)
            return None
        if record is None:  # purged meanwhile: nothing to store
            finish(task_id)
            return None
        try:
            PostprocessSpec.from_params(record.params)
        except UserError as exc:
            service.store.fail(task_id, f"post-processing failed: {exc}")
            finish(task_id)
            return None
        return record, image

    def _postprocess(self, spec: PostprocessSpec, images: list[GeneratedImage]) -> list[GeneratedImage]:
        """The chain over the group; if it fails as a whole, each image alone, so that only the
        image that cannot be post-processed fails."""
        try:
            return apply_chain(images, spec, self.engine)
        except UserError as exc:
            if len(images) == 1:
                return [replace(images[0], post={"error": f"post-processing failed: {exc}"})]
        return [self._postprocess(spec, [image])[0] for image in images]

    def _store_outcome(self, job: InFlight, record: TaskRecord, image: GeneratedImage) -> _Stored | None:
        """Write the blobs of one image; its row is committed with its group's (``_commit``)."""
        service, task_id, finish = self.service, job.lease.task_id, self._held.finish
        if "error" in image.post and (current := service.store.get(task_id)) and current.cancel_requested:
            service.store.mark_canceled(task_id)  # cancelled while post-processing: its passes stopped
            finish(task_id)
            return None
        if "error" in image.post:
            service.store.fail(task_id, image.post["error"])
            finish(task_id)
            return None
        try:
            results = store_images(
                service.blobs,
                task_id,
                image,
                record.params.get("format", "webp"),
                record.params.get("embed_metadata", True),
            )
        except BlobWriteError as exc:  # neither store nor spool took it: try the job again later
            log.error("could not store results of %s: %s", task_id, exc)
            service.queue.nack(self._held.owner, task_id, delay_s=5.0)
            return None
        # A start not recorded yet (a job quicker than a loop turn, or the database was away all
        # through it) is recorded in the same commit, else the fenced succeed would find no running
        # attempt and the task would be acked unfinished.
        completion = Completion(task_id, job.attempt, results, image_metadata(image), start=not job.started)
        return _Stored(completion, image)

    def _commit(self, stored: list[_Stored]) -> None:
        """One commit for a group's successes and their acks, then one read to tell SSE and webhooks."""
        if not stored:
            return
        service = self.service
        succeeded = service.complete(self._held.owner, [s.completion for s in stored])
        for item in stored:
            task_id = item.completion.task_id
            if task_id in succeeded:
                elapsed = item.image.timings.total_s
                service.avg_task_s = 0.8 * service.avg_task_s + 0.2 * max(elapsed, 0.01)
                log.info(
                    "task succeeded", extra=_log_fields(item.image, item.completion.attempt, "succeeded")
                )
        service.notify_many([s.completion.task_id for s in stored])


def _log_fields(image: GeneratedImage, attempt: int, status: str) -> dict:
    job = image.job
    return {
        "task_id": job.job_id,
        "model": job.model,
        "resolution": f"{job.width}x{job.height}",
        "loras": [lora.name for lora in job.loras],
        "postprocess": ["encode", "thumbnails"],
        "status": status,
        "seconds": round(image.timings.total_s, 3),
        "attempt": attempt,
    }
