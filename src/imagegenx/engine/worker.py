"""The GPU side of the service: lease jobs, run them on the engine, store results, acknowledge.

Durability order for every job: result blobs written (fixed keys, so a retry overwrites), then
the task row committed (fenced by attempt number, so a stale attempt never wins), then the queue
lease acknowledged. On the embedded queue the last two are one transaction. A process killed
anywhere in between leaves a lease that comes back and is either finished again or, if the row is
already final, simply acknowledged.

Database writes are few and batched, because each is a commit (an fsync on SQLite) and SQLite has
one write lock for the whole process: the engine thread never writes (its events only note starts
and progress, ``engine.jobnotes``), the loop records the starts of a whole UNet batch in one
transaction, progress at most every ``PROGRESS_FLUSH_S``, and a finished group commits its rows and
acks together. A 1-step job that starts and finishes between two loop turns has its start folded
into that same commit.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from opentelemetry import trace
from PIL import Image

from imagegenx.engine.engine import Engine, JobFailed
from imagegenx.engine.jobnotes import JobNotes
from imagegenx.engine.service import Service, input_key, job_from_params, result_key
from imagegenx.postprocess.chain import PostprocessSpec, apply_chain
from imagegenx.postprocess.encode import ImageFormat, encode_image, image_metadata, to_pil
from imagegenx.queue.base import Lease
from imagegenx.storage.blobs import BlobWriteError
from imagegenx.storage.tasks import Completion, StorageUnavailable
from imagegenx.types import GeneratedImage, JobStatus, ProgressEvent, TaskRecord, TaskStatus, UserError

log = logging.getLogger("imagegenx.worker")
tracer = trace.get_tracer("imagegenx.worker")  # a no-op unless an exporter is configured


@dataclass
class _InFlight:
    lease: Lease
    attempt: int
    span: trace.Span
    future: Future | None = None
    started: bool = False  # the start is committed
    noted: bool = False  # the engine reported its first step (the start is written soon)


@dataclass
class _Stored:
    """An image whose blobs are written and whose row waits for its group's commit."""

    completion: Completion
    image: GeneratedImage


THUMBNAILS = (512, 256)
CANCEL_POLL_S = 0.5  # how often the task rows of running jobs are checked for a cancel request
PROGRESS_FLUSH_S = 0.5  # progress reaches the database at most this often (SSE hears every step)


def default_owner() -> str:
    """Stable per host and role, so a restarted single-process server reclaims its own leases."""
    return f"serve@{socket.gethostname()}"[:64]


class ServiceWorker:
    def __init__(
        self, service: Service, engine: Engine, *, owner: str | None = None, capacity: int | None = None
    ) -> None:
        self.service = service
        self.engine = engine
        self.owner = owner or default_owner()
        # Lease only what the engine can start soon: the rest stays queued for other workers.
        self.capacity = capacity or 2 * service.settings.engine.max_batch
        self.lease_s = service.settings.service.lease_s
        self._in_flight: dict[str, _InFlight] = {}
        # Jobs the engine finished whose post-processing and storing runs on the post thread, so
        # the loop keeps leasing and heartbeating meanwhile (their leases stay ours until acked).
        self._storing: set[str] = set()
        self._post = ThreadPoolExecutor(1, thread_name_prefix="imagegenx-post")
        # Storing an outcome is mostly encoding (WebP of the image and two thumbnails: ~60 ms of CPU for
        # 512² here), which releases the GIL: the images of a group are stored in parallel.
        self._store = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="imagegenx-store")
        self._portraits = ThreadPoolExecutor(2, thread_name_prefix="imagegenx-portrait")
        self._done: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._draining = threading.Event()  # no new leases: the process is shutting down
        self._notes = JobNotes()  # noted by the engine thread, written by the loop
        self._unsubscribe_cancels: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="imagegenx-worker", daemon=True)
        if service.cancel_bus is not None:  # cancels from any process (an API node) reach this engine
            self._unsubscribe_cancels = service.cancel_bus.subscribe(self.cancel)
        else:
            service.on_cancel = self.cancel
        engine.subscribe(self._on_engine_event)

    def start(self) -> None:
        # A previous process with our owner id is dead (one server per host in embedded mode).
        reclaimed = self.service.queue.release_owner(self.owner)
        if reclaimed:
            log.info("reclaimed %d job(s) from a previous run", reclaimed)
        self._thread.start()

    def stop(self) -> None:
        if self._unsubscribe_cancels is not None:
            self._unsubscribe_cancels()
        self._stop.set()
        self._thread.join(timeout=30)
        self._post.shutdown(wait=True)
        self._store.shutdown(wait=True)
        self._portraits.shutdown(wait=False, cancel_futures=True)  # a portrait cut short runs again

    def cancel(self, task_id: str) -> None:
        self.engine.cancel(task_id)

    def drain(self, timeout_s: float) -> list[str]:
        """Graceful shutdown: take no more jobs, let those in hand finish for up to ``timeout_s``,
        then stop and give back the leases still held (ready again at once for other workers).
        Returns the task ids given back."""
        self._draining.set()
        deadline = time.monotonic() + timeout_s
        while (self._in_flight or self._storing) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [*list(self._in_flight), *list(self._storing)]
        for task_id in left:  # they run again from the start elsewhere: stop them here
            self.engine.cancel(task_id)
        self.stop()
        return [task_id for task_id in left if self.service.queue.nack(self.owner, task_id)]

    # Loop ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        last_heartbeat = last_sweep = last_purge = last_cancel_check = last_progress = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                self._drain_done()
                self._flush_starts()
                if now - last_progress > PROGRESS_FLUSH_S:
                    self._flush_progress()
                    last_progress = now
                self._lease_more()
                if now - last_heartbeat > self.lease_s / 3:
                    held = [*self._in_flight, *list(self._storing)]
                    self.service.queue.heartbeat(self.owner, held, self.lease_s)
                    last_heartbeat = now
                if self._in_flight and now - last_cancel_check > CANCEL_POLL_S:
                    self._check_cancels()
                    last_cancel_check = now
                if now - last_sweep > 1.0:
                    self.service.expire_stale()
                    self.service.queue.recover_expired()
                    self.service.blobs.sync_spool()
                    last_sweep = now
                if now - last_purge > 3600:
                    self._purge_old_history()
                    last_purge = now
                self._wait_for_work()
            except StorageUnavailable as exc:  # the database is down: wait, lose nothing
                log.warning("storage unavailable, retrying: %s", exc)
                self._stop.wait(1.0)
            except Exception:  # never let one bad job kill the worker
                log.exception("worker loop error")
                self._stop.wait(0.5)

    def _check_cancels(self) -> None:
        """A cancel through another process (an API node) only marks the task row: stop such jobs
        here at their next step. Rows gone final meanwhile (expired, failed by a sweep) stop too."""
        for record in self.service.store.get_many(list(self._in_flight)):
            if record.cancel_requested or record.status.final:
                self.engine.cancel(record.task_id)

    def _purge_old_history(self) -> None:
        """Tasks past the history window go, with their images (seed 003: 90 days)."""
        cutoff = time.time() - self.service.settings.storage.history_days * 86400
        for record in self.service.store.purge_before(cutoff):
            self.service.blobs.delete_prefix(f"results/{record.task_id}/")
            self.service.blobs.delete_prefix(f"inputs/{record.task_id}/")

    def _wait_for_work(self) -> None:
        try:
            task_id = self._done.get(timeout=0.05)
        except queue.Empty:
            return
        self._done.put(task_id)

    def _lease_more(self) -> None:
        free = self.capacity - len(self._in_flight) - len(self._storing)
        if free <= 0 or self._draining.is_set():
            return
        leases = self.service.queue.lease(self.owner, free, self.lease_s)
        records = {r.task_id: r for r in self.service.store.get_many([lease.task_id for lease in leases])}
        for lease in leases:
            self._begin(lease, records.get(lease.task_id))

    def _begin(self, lease: Lease, record: TaskRecord | None) -> None:
        service, task_id = self.service, lease.task_id
        if record is None or record.status.final:
            service.queue.ack(self.owner, task_id)
            return
        if lease.delivery > service.settings.service.max_deliveries:
            service.store.fail(task_id, f"gave up after {lease.delivery - 1} attempts that did not finish")
            self._finish(task_id)
            return
        if record.cancel_requested:
            service.store.mark_canceled(task_id)
            self._finish(task_id)
            return
        if record.task_type == "portrait":
            self._begin_portrait(lease, record)
            return
        # The attempt counts real starts (the engine's first step), not leases.
        job = _InFlight(lease, attempt=record.attempts + 1, span=tracer.start_span("inference"))
        job.span.set_attributes(
            {"task_id": task_id, "model": record.model, "resolution": f"{record.width}x{record.height}"}
        )
        self._in_flight[task_id] = job  # before submit: the engine may report the first step at once
        try:
            image = service.blobs.get(input_key(task_id, "image")) if record.task_type != "text2img" else None
            mask = service.blobs.get(input_key(task_id, "mask")) if record.task_type == "inpaint" else None
            controls = [
                service.blobs.get(input_key(task_id, f"control{index}"))
                for index in range(len(record.params.get("controls", [])))
            ]
            job.future = self.engine.submit(job_from_params(task_id, record.params, image, mask, controls))
        except (UserError, KeyError) as exc:
            self._in_flight.pop(task_id, None)
            service.store.fail(task_id, str(exc))
            self._finish(task_id)
            return
        job.future.add_done_callback(lambda _f, task_id=task_id: self._done.put(task_id))

    def _begin_portrait(self, lease: Lease, record: TaskRecord) -> None:
        """A portrait task runs its stages on the post thread pool (it waits on the engine a lot)."""
        attempt = record.attempts + 1
        if not self.service.store.start(record.task_id, attempt):
            self._finish(record.task_id)
            return
        self.service.notify(record.task_id)
        self._storing.add(record.task_id)  # heartbeats keep its lease while it runs
        self._portraits.submit(self._run_portrait, record, attempt)

    def _run_portrait(self, record: TaskRecord, attempt: int) -> None:
        from imagegenx.engine.portrait_task import PortraitCanceled, WorkerStopping, run_portrait_task

        service, task_id = self.service, record.task_id

        def publish(data: dict) -> None:
            service.events.publish(task_id, data)

        try:
            results, metadata = run_portrait_task(service, self.engine, record, publish, self._stop.is_set)
            service.store.succeed(task_id, attempt, results, metadata)
        except WorkerStopping:  # the lease stays: after it expires the task runs again elsewhere
            self._storing.discard(task_id)
            return
        except PortraitCanceled:
            service.store.mark_canceled(task_id)
        except UserError as exc:
            service.store.fail(task_id, str(exc), attempt)
        except BlobWriteError as exc:  # nothing reported as done: the task runs again later
            log.error("could not store results of %s: %s", task_id, exc)
            service.queue.nack(self.owner, task_id, delay_s=5.0)
            self._storing.discard(task_id)
            return
        except Exception as exc:  # a bug fails this task with the reason, never the worker
            log.exception("portrait task %s failed", task_id)
            service.store.fail(task_id, f"internal error: {exc!r}", attempt)
        self._storing.discard(task_id)
        self._finish(task_id)

    def _drain_done(self) -> None:
        """Hand every job the engine finished to the post thread, as one group (one chain batch)."""
        finished = []
        while True:
            try:
                task_id = self._done.get_nowait()
            except queue.Empty:
                break
            entry = self._in_flight.pop(task_id, None)
            if entry is not None:
                entry.span.end()
                self._storing.add(task_id)
                finished.append(entry)
        if finished:
            self._notes.forget(entry.lease.task_id for entry in finished)  # unwritten starts: job.started
            self._post.submit(self._complete_group, finished)

    def _flush_starts(self) -> None:
        """Record the starts the engine reported since the last turn, in one transaction."""
        starts = self._notes.take_starts()
        if not starts:
            return
        try:
            started = self.service.store.start_many(starts)
        except StorageUnavailable:  # try again next turn; the final commit records it otherwise
            self._notes.put_back_starts(starts)
            raise
        for task_id in starts:
            job = self._in_flight.get(task_id)
            if job is not None:
                job.started = task_id in started
            if task_id not in started:  # final or cancel requested meanwhile: stop it
                self.engine.cancel(task_id)
        # No notify here: the engine's step events told this process's SSE clients already, and a
        # status read now would reach them after newer progress.

    def _flush_progress(self) -> None:
        """Write the latest progress of running jobs, in one transaction (at most every PROGRESS_FLUSH_S)."""
        progress = self._notes.take_progress()
        with contextlib.suppress(StorageUnavailable):  # progress is advisory: the next flush has newer
            self.service.store.set_progress_many(progress)

    # Outcomes (on the post thread) --------------------------------------------------------------

    def _complete_group(self, entries: list[_InFlight]) -> None:
        """Post-process the images together where their chains agree, then store each outcome."""
        try:
            groups: dict[PostprocessSpec, list[tuple[_InFlight, TaskRecord, GeneratedImage]]] = {}
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
                self._storing.discard(entry.lease.task_id)

    def _engine_outcome(
        self, job: _InFlight, record: TaskRecord | None
    ) -> tuple[TaskRecord, GeneratedImage] | None:
        """The task's record and image, or None when the job was cancelled or failed (recorded)."""
        service, task_id = self.service, job.lease.task_id
        try:
            image = job.future.result()
        except CancelledError:
            service.store.mark_canceled(task_id)
            self._finish(task_id)
            return None
        except JobFailed as exc:
            service.store.fail(task_id, str(exc))
            self._finish(task_id)
            return None
        if record is None:  # purged meanwhile: nothing to store
            self._finish(task_id)
            return None
        try:
            PostprocessSpec.from_params(record.params)
        except UserError as exc:
            service.store.fail(task_id, f"post-processing failed: {exc}")
            self._finish(task_id)
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

    def _store_outcome(self, job: _InFlight, record: TaskRecord, image: GeneratedImage) -> _Stored | None:
        """Write the blobs of one image; its row is committed with its group's (``_commit``)."""
        service, task_id = self.service, job.lease.task_id
        if "error" in image.post and (current := service.store.get(task_id)) and current.cancel_requested:
            service.store.mark_canceled(task_id)  # cancelled while post-processing: its passes stopped
            self._finish(task_id)
            return None
        if "error" in image.post:
            service.store.fail(task_id, image.post["error"])
            self._finish(task_id)
            return None
        try:
            results = self._store_images(
                task_id, image, record.params.get("format", "webp"), record.params.get("embed_metadata", True)
            )
        except BlobWriteError as exc:  # neither store nor spool took it: try the job again later
            log.error("could not store results of %s: %s", task_id, exc)
            service.queue.nack(self.owner, task_id, delay_s=5.0)
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
        succeeded = service.complete(self.owner, [s.completion for s in stored])
        for item in stored:
            task_id = item.completion.task_id
            if task_id in succeeded:
                elapsed = item.image.timings.total_s
                service.avg_task_s = 0.8 * service.avg_task_s + 0.2 * max(elapsed, 0.01)
                log.info(
                    "task succeeded", extra=_log_fields(item.image, item.completion.attempt, "succeeded")
                )
        service.notify_many([s.completion.task_id for s in stored])

    def _store_images(
        self, task_id: str, image: GeneratedImage, fmt_name: str, embed_metadata: bool
    ) -> dict[str, str]:
        fmt = ImageFormat.parse(fmt_name)
        results = {"original": result_key(task_id, "original", fmt.extension)}
        original = encode_image(image, fmt, embed_metadata=embed_metadata)
        self.service.blobs.put(results["original"], original)
        pil = to_pil(image)
        for side in THUMBNAILS:
            results[str(side)] = result_key(task_id, str(side), ".webp")
            if fmt is ImageFormat.WEBP and max(pil.size) <= side:
                # Nothing to shrink, and the original is WebP already: encoding the same pixels again
                # cost as much as the original (a 512² image's "512" was ~45% of its storing CPU).
                self.service.blobs.put(results[str(side)], original)
                continue
            thumb = pil.copy()
            thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            thumb.save(buf, "WEBP", quality=85)
            self.service.blobs.put(results[str(side)], buf.getvalue())
        return results

    def _finish(self, task_id: str) -> None:
        self.service.queue.ack(self.owner, task_id)
        self._notes.forget([task_id])
        self.service.notify(task_id)

    def _on_engine_event(self, event: ProgressEvent) -> None:
        """Runs on the engine thread: no database I/O here (it would stall the GPU loop on SQLite's
        write lock); the start and progress are noted for the loop to write in batches."""
        if event.status is not JobStatus.RUNNING or not event.total:
            return
        task_id = event.job_id
        job = self._in_flight.get(task_id)
        first = job is not None and not job.noted
        if first:
            job.noted = True
        progress = self._notes.step(
            task_id, event.step, event.total, start_attempt=job.attempt if first else None
        )
        data = {"status": str(TaskStatus.PROCESSING), "progress": progress}
        if event.preview:  # a small JPEG of the latents, for the page's queue
            data["preview"] = "data:image/jpeg;base64," + base64.b64encode(event.preview).decode()
        self.service.events.publish(task_id, data)


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
