"""The ``Engine`` facade: ``submit``, ``cancel``, ``subscribe``. One engine owns the device.

A single worker thread runs the loop (as vLLM's engine step: schedule, execute, update):

1. take a batch of compatible jobs from the ``BatchScheduler`` (after its 50 ms window);
2. hand it to the ``BatchRunner`` (engine/batch_runner.py), which makes its model resident and its
   LoRA set active (never reloading the base model), prepares the jobs' samples and steps the whole
   batch one UNet call at a time; between steps cancelled samples leave, finished ones are decoded,
   and waiting compatible jobs join;
3. resolve each job's future with a ``GeneratedImage``, or fail just that job with a reason (this
   file: a job's life from ``submit`` to its outcome, NaN retries and cancellation included).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, replace

from imagegenx.config import Settings
from imagegenx.engine.batch_runner import BatchRunner
from imagegenx.engine.metrics import EngineMetrics, failure_reason
from imagegenx.engine.scheduler import BatchScheduler, SchedulerConfig
from imagegenx.engine.validation import validate_job
from imagegenx.models.cache import ModelCache
from imagegenx.models.compile_artifacts import save_compile_artifacts
from imagegenx.models.loader import LoadedModel
from imagegenx.models.speed import ready_thread_for_cuda_graphs
from imagegenx.pipelines.flow import FlowRunner
from imagegenx.pipelines.sample import to_uint8
from imagegenx.pipelines.sd import SDRunner
from imagegenx.types import GeneratedImage, JobSpec, JobStatus, ProgressEvent, Timings, UserError

log = logging.getLogger("imagegenx.engine")

Listener = Callable[[ProgressEvent], None]


class JobFailed(RuntimeError):
    """The job could not produce an image; the message says why."""


class Engine:
    def __init__(self, settings: Settings | None = None, models: ModelCache | None = None) -> None:
        self.settings = settings or Settings()
        self.models = models or ModelCache(self.settings.models)
        engine = self.settings.engine
        self.scheduler = BatchScheduler(
            SchedulerConfig(
                window_s=engine.batch_window_ms / 1000,
                aging_s=engine.aging_s,
                max_pixels_per_batch=engine.max_pixels_per_batch,
                max_batch=engine.max_batch,
            )
        )
        self.metrics = EngineMetrics(self.models)
        self._active: dict[str, _Entry] = {}
        self._cancel_requested: set[str] = set()
        self._nan_tries: dict[str, int] = {}  # job id -> retries after NaN output (nan_policy="retry")
        self._listeners: list[Listener] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._ids = itertools.count()
        self._batches = BatchRunner(
            self.settings,
            self.models,
            self.scheduler,
            self.metrics,
            self._wake,
            emit=self._emit,
            fail=self._fail,
            deliver=self._deliver,
            drop_if_canceled=self._drop_if_canceled,
            cancel_requested=self._cancel_requested,
        )
        self._thread = threading.Thread(target=self._loop, name="imagegenx-engine", daemon=True)
        self._thread.start()

    # Facade -------------------------------------------------------------------------------------

    def submit(self, job: JobSpec) -> Future[GeneratedImage]:
        """Queue one image; the future resolves to a ``GeneratedImage`` or raises ``JobFailed``."""
        validate_job(job, self.settings.engine)
        self.models.source(job.model)  # an unknown model is the caller's mistake: say so now
        if not job.job_id:
            job = _with_id(job, f"{uuid.uuid4().hex[:12]}-{next(self._ids)}")
        future: Future[GeneratedImage] = Future()
        with self._wake:
            if job.job_id in self._active:
                raise UserError(f"job id {job.job_id!r} is already queued or running")
            self._active[job.job_id] = _Entry(job, future, time.monotonic())
            self.scheduler.add(job, time.monotonic())
            self.metrics.waiting.set(len(self.scheduler))
            self._wake.notify()
        future.job_id = job.job_id  # type: ignore[attr-defined]
        self._emit(ProgressEvent(job.job_id, JobStatus.QUEUED, 0, job.steps))
        return future

    def run(self, jobs: Sequence[JobSpec]) -> list[GeneratedImage | Exception]:
        """Submit ``jobs`` together (so compatible ones share batches) and wait for all of them.

        The post-processing chain's ``Denoiser``: each job's image, or the exception that ended it.
        """
        futures: list[Future[GeneratedImage] | Exception] = []
        for job in jobs:
            try:
                futures.append(self.submit(job))
            except UserError as exc:
                futures.append(exc)
        results: list[GeneratedImage | Exception] = []
        for future in futures:
            if isinstance(future, Exception):
                results.append(future)
                continue
            try:
                results.append(future.result())
            except JobFailed as exc:
                results.append(exc)
            except CancelledError:
                results.append(JobFailed("canceled"))
        return results

    def cancel(self, job_id: str) -> bool:
        """A queued job never runs; a running one stops at the next step boundary. The job's
        post-processing passes (ids ``<job_id>:...``: hires, refine, fixes) are cancelled with it."""
        with self._wake:
            found = [i for i in self._active if i == job_id or i.startswith(f"{job_id}:")]
            for i in found:
                if self.scheduler.cancel(i):
                    self._finish_canceled(i)
                else:
                    self._cancel_requested.add(i)
        return bool(found)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` (on the engine thread; keep it quick) with every progress event."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def close(self) -> None:
        """Finish the batch in flight, cancel jobs that have not started, stop the worker; keep
        what was compiled (``save_compile_artifacts``)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=60)
        self.save_compile_artifacts()

    def save_compile_artifacts(self) -> int:
        """Write the compiled artifacts to ``ModelSettings.compile_artifacts`` when compile is on;
        returns the bytes written (0: off, or nothing compiled).

        Not with CUDA graphs (``reduce-overhead``): on the H200 with torch 2.11 the process died of a
        segmentation fault right after ``save_cache_artifacts`` once CUDA-graphed SDXL batches had
        run (BENCHMARKS.md, fifth session); Inductor's disk cache still spares a restart there."""
        models = self.settings.models
        if models.compile in ("off", "reduce-overhead"):
            return 0
        return save_compile_artifacts(models.compile_artifacts)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Worker loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        ready_thread_for_cuda_graphs(self.settings.models.compile)
        while True:
            with self._wake:
                batch: list[JobSpec] = []
                while not self._stopping:
                    batch = self.scheduler.next_batch(time.monotonic())
                    if batch:
                        break
                    self._wake.wait(self.scheduler.seconds_until_ready(time.monotonic()))
                if self._stopping:
                    # Nothing is left hanging: jobs that never started are cancelled.
                    for job_id in list(self._active):
                        self.scheduler.cancel(job_id)
                        self._finish_canceled(job_id)
                    return
                self.metrics.waiting.set(len(self.scheduler))
            try:
                self._run_batch(batch)
            except Exception as exc:  # a bug must fail the batch's jobs, never kill the engine
                log.exception("internal error in a batch of %d job(s) of %s", len(batch), batch[0].model)
                for job in batch:
                    self._fail(job.job_id, f"internal error: {exc!r}")

    def _run_batch(self, batch: list[JobSpec]) -> None:
        # A seam of its own: scripts/profile_engine_cpu.py wraps it on the engine thread.
        self._batches.run(batch)

    def _runner(self, model: LoadedModel) -> SDRunner | FlowRunner:
        """The model's runner (tests and scripts reach it to set compile flags)."""
        return self._batches.runner(model)

    # Outcomes -----------------------------------------------------------------------------------

    def _deliver(
        self, job: JobSpec, image, model: LoadedModel, batch_size: int, times: dict, steps: int
    ) -> None:
        if image is None:
            if not self._retry_nan(job):
                tries = self._nan_tries.get(job.job_id, 0) + 1
                self._fail(
                    job.job_id,
                    "the image came out as NaN/infinite values (numerical overflow)"
                    + (f" in {tries} tries with different seeds" if tries > 1 else "")
                    + "; not returned",
                )
            return
        pixels = to_uint8(image)
        entry = self._pop(job.job_id)
        queued = time.monotonic() - entry.submitted_at - sum(times.values()) if entry else 0.0
        result = GeneratedImage(
            job=job,
            width=pixels.shape[1],
            height=pixels.shape[0],
            rgb=pixels.tobytes(),
            model_name=model.source.name,
            batch_size=batch_size,
            timings=Timings(
                queued_s=max(0.0, queued),
                encode_prompt_s=times.get("encode_prompt_s", 0.0),
                denoise_s=times.get("denoise_s", 0.0),
                decode_s=times.get("decode_s", 0.0),
            ),
        )
        self.metrics.images.labels(job.model, "succeeded").inc()
        for lora in job.loras:
            self.metrics.lora_images.labels(lora.name).inc()
        resolution = f"{job.width}x{job.height}"
        self.metrics.generation_seconds.labels(job.model, resolution).observe(result.timings.total_s)
        self._emit(ProgressEvent(job.job_id, JobStatus.SUCCEEDED, steps, steps))
        if entry is not None:
            entry.future.set_result(result)

    def _retry_nan(self, job: JobSpec) -> bool:
        """Under ``nan_policy="retry"``, queue a non-finite image again with a new seed; False once
        the retries are spent (or the policy is "fail"). The result then carries the seed it used."""
        settings = self.settings.engine
        tries = self._nan_tries.get(job.job_id, 0)
        if settings.nan_policy != "retry" or tries >= settings.nan_retries:
            return False
        retry = replace(job, seed=(job.seed + _SEED_STEP * (tries + 1)) % 2**32)
        with self._wake:
            entry = self._active.get(job.job_id)
            if entry is None:
                return False
            self._nan_tries[job.job_id] = tries + 1
            entry.job = retry
            self.scheduler.add(retry, time.monotonic())
            self._wake.notify()
        return True

    def _fail(self, job_id: str, reason: str) -> None:
        entry = self._pop(job_id)
        self._emit(ProgressEvent(job_id, JobStatus.FAILED, message=reason))
        if entry is not None:
            self.metrics.images.labels(entry.job.model, "failed").inc()
            self.metrics.failures.labels(failure_reason(reason)).inc()
            entry.future.set_exception(JobFailed(reason))

    def _drop_if_canceled(self, job_id: str) -> bool:
        with self._wake:
            if job_id not in self._cancel_requested:
                return False
            self._finish_canceled(job_id)
        return True

    def _finish_canceled(self, job_id: str) -> None:
        """Called with the lock held."""
        self._cancel_requested.discard(job_id)
        self._nan_tries.pop(job_id, None)
        entry = self._active.pop(job_id, None)
        self._emit(ProgressEvent(job_id, JobStatus.CANCELED))
        if entry is not None:
            self.metrics.images.labels(entry.job.model, "canceled").inc()
            entry.future.cancel()

    def _pop(self, job_id: str) -> _Entry | None:
        with self._wake:
            self._cancel_requested.discard(job_id)
            self._nan_tries.pop(job_id, None)
            return self._active.pop(job_id, None)

    def _emit(self, event: ProgressEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not stop the engine
                continue


@dataclass
class _Entry:
    job: JobSpec
    future: Future[GeneratedImage]
    submitted_at: float


def _with_id(job: JobSpec, job_id: str) -> JobSpec:
    return replace(job, job_id=job_id)


_SEED_STEP = 0x9E3779B9  # a NaN retry's seed: far from the first, and the same on every run
