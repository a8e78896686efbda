"""Running one batch of compatible jobs through its denoising steps, on the engine thread.

The ``Engine`` hands every batch its scheduler forms to ``BatchRunner.run``:

1. make the batch's model resident and its LoRA set, ControlNets and identity adapter active;
2. prepare the jobs' samples (one noise draw for all), then step the whole batch one UNet call at a
   time; between steps cancelled samples leave, finished ones are decoded, and waiting compatible
   jobs join (continuous batching); step previews start on the device and ride a later event;
3. after CUDA out-of-memory a step is split in halves and the key's batch limit lowered for good;
   decoding falls back to one image at a time;
4. flow-matching families (SD 3.5, Flux) run the ``FlowRunner``'s own loop instead.

A job's outcome (its image, a NaN retry, a failure, a cancellation) is the engine's business: this
module reports through the callbacks it is given and owns no job state.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

import torch

from imagegenx.config import Settings
from imagegenx.engine.metrics import EngineMetrics
from imagegenx.engine.scheduler import BatchScheduler
from imagegenx.models.cache import ModelCache
from imagegenx.models.loader import LoadedModel
from imagegenx.pipelines.flow import FlowRunner
from imagegenx.pipelines.hostcopy import PendingImages
from imagegenx.pipelines.preview import PendingPreviews, preview_due
from imagegenx.pipelines.sample import Sample
from imagegenx.pipelines.sd import SDRunner
from imagegenx.types import JobSpec, JobStatus, ProgressEvent, UserError

log = logging.getLogger("imagegenx.engine")

Emit = Callable[[ProgressEvent], None]
Fail = Callable[[str, str], None]  # (job id, reason)
# (job, image or None when non-finite, model, batch size, timings, steps)
Deliver = Callable[[JobSpec, Any, LoadedModel, int, dict, int], None]


@dataclass
class _Decoding:
    """Finished samples whose images are on their way from the device."""

    samples: list[Sample]
    model: LoadedModel
    pending: list[PendingImages]
    batch_size: int
    queue_s: float  # seconds spent queuing the decode


class BatchRunner:
    """Denoises the engine's batches; shares the engine's scheduler, metrics and lock."""

    # Deliver a step's finished images only after the next step is queued: None = on a GPU only.
    overlap_decode: bool | None = None

    def __init__(
        self,
        settings: Settings,
        models: ModelCache,
        scheduler: BatchScheduler,
        metrics: EngineMetrics,
        lock: threading.Condition,
        *,
        emit: Emit,
        fail: Fail,
        deliver: Deliver,
        drop_if_canceled: Callable[[str], bool],
        cancel_requested: Container[str],
    ) -> None:
        self.settings = settings
        self.models = models
        self.scheduler = scheduler
        self.metrics = metrics
        self._lock = lock  # the engine's: guards the scheduler between steps
        self._emit = emit
        self._fail = fail
        self._deliver = deliver
        self._drop_if_canceled = drop_if_canceled
        self._cancel_requested = cancel_requested

    def run(self, batch: list[JobSpec]) -> None:
        """Run ``batch`` (and the compatible jobs that join it) until no sample is left."""
        key = batch[0].batch_key
        try:
            model = self.models.get(key.model)
            runner = self.runner(model)
            if model.extras["loras"].activate(key.loras) and isinstance(runner, SDRunner):
                runner.prompts.clear_cache()
        except UserError as exc:
            for job in batch:
                self._fail(job.job_id, str(exc))
            return
        if isinstance(runner, SDRunner):
            # ControlNets are built from the plain UNet: load them before identity attention goes on.
            runner.set_identity(None, None)
            try:
                for ref in key.controls:
                    self.models.controlnet(ref, model)
                adapter = self.models.identity_adapter(key.identity[0], model) if key.identity else None
            except UserError as exc:
                for job in batch:
                    self._fail(job.job_id, str(exc))
                return
            runner.set_identity(adapter, key.identity[1] if key.identity else None)
        if isinstance(runner, FlowRunner):
            if key.controls or key.identity:
                for job in batch:
                    self._fail(
                        job.job_id, f"ControlNet needs an SD 1.5, SD 2.x or SDXL model, not {model.family}"
                    )
                return
            self._run_flow(runner, model, batch)
            return

        running: list[Sample] = []
        joining = batch
        previews = PendingPreviews()  # the loop's own: whatever is pending goes with the batch
        # Finished samples' images on their way to the host. On a GPU they are handed over only after
        # the next step is queued, so the device decodes and steps while this thread delivers.
        decoding: list[_Decoding] = []
        overlap = self.overlap_decode if self.overlap_decode is not None else runner.device.type == "cuda"
        try:
            while joining or running:
                running += self._prepare(runner, joining)
                running = [s for s in running if not self._drop_if_canceled(s.job.job_id)]
                if not running:
                    break
                started = time.perf_counter()
                running = self._step(runner, running)
                elapsed = time.perf_counter() - started
                self.metrics.step_seconds.observe(elapsed)
                self._deliver_decoded(decoding)  # the last step's images: this step is queued behind
                self._report_step(running, elapsed, previews, model)
                finished = [s for s in running if s.done]
                running = [s for s in running if not s.done]
                for sample in finished:
                    previews.drop(sample.job.job_id)  # still on its way: the image follows instead
                if finished:
                    decoding.append(self._start_decode(runner, model, finished, len(finished) + len(running)))
                    if not overlap:
                        self._deliver_decoded(decoding)
                joining = []
                if self.settings.engine.continuous_batching:
                    with self._lock:
                        free = self.scheduler.max_batch_size(key) - len(running)
                        joining = self.scheduler.admit(key, free, time.monotonic()) if free > 0 else []
                        self.metrics.waiting.set(len(self.scheduler))
        finally:
            self._deliver_decoded(decoding)

    def runner(self, model: LoadedModel) -> SDRunner | FlowRunner:
        """One runner per resident model, kept with it (evicting the model drops its runner too)."""
        runner = model.extras.get("runner")
        if runner is None:
            if model.uses_engine_loop:
                runner = SDRunner(model)
                runner.uint8_output = True  # results become uint8 anyway: convert before the host copy
            else:
                runner = FlowRunner(model)
            if (rows := self.settings.engine.fault_oom_above_rows) > 0 and isinstance(runner, SDRunner):
                runner.before_unet = functools.partial(_simulated_oom, rows)
            pixels = self.settings.engine.fault_oom_decode_above_pixels
            if pixels > 0 and isinstance(runner, SDRunner):
                runner.before_decode = functools.partial(_simulated_decode_oom, pixels)
            model.extras["runner"] = runner
        return runner

    def _report_step(
        self, running: list[Sample], elapsed: float, previews: PendingPreviews, model: LoadedModel
    ) -> None:
        """Each sample's progress event after a step, with a preview where one is ready or due."""
        ready = previews.ready()  # started at earlier steps, their copies done by now
        for sample in running:
            sample.times["denoise_s"] = sample.times.get("denoise_s", 0.0) + elapsed
            job_id, step, total = sample.job.job_id, sample.index, sample.total_steps
            self._emit(ProgressEvent(job_id, JobStatus.RUNNING, step, total, preview=ready.get(job_id)))
            if preview_due(step, total):
                self._preview(previews, model, sample)

    def _preview(self, previews: PendingPreviews, model: LoadedModel, sample: Sample) -> None:
        """Start a latent-to-RGB JPEG, for one of the job's next progress events (never waiting for
        the device here); a failure costs the preview, never the job."""
        if not self.settings.engine.step_previews:
            return
        tiny = model.tiny_decoder if self.settings.engine.preview_decoder == "tiny" else None
        try:
            previews.start(sample.job.job_id, sample.latents, model.family, tiny)
        except Exception:
            log.exception("step preview of %s failed", sample.job.job_id)

    def _prepare(self, runner: SDRunner, jobs: list[JobSpec]) -> list[Sample]:
        """The jobs' samples, prepared together (one noise draw for all); a job that cannot be
        prepared fails alone."""
        ready: list[JobSpec] = []
        nets: list[list] = []
        for job in jobs:
            try:
                nets.append([self.models.controlnet(control.model, runner.model) for control in job.controls])
            except UserError as exc:
                self._fail(job.job_id, str(exc))
                continue
            ready.append(job)
        samples = []
        for job, sample in zip(ready, runner.prepare_each(ready, nets), strict=True):
            if isinstance(sample, UserError):
                self._fail(job.job_id, str(sample))
                continue
            samples.append(sample)
            self._emit(ProgressEvent(job.job_id, JobStatus.RUNNING, 0, sample.total_steps))
        return samples

    def _step(self, runner: SDRunner, samples: list[Sample]) -> list[Sample]:
        """One step for all, in chunks no larger than the key's current limit; returns the survivors.

        After CUDA out-of-memory the chunk is halved and the key's limit lowered for good, so later
        steps and later batches fit; an image that does not fit even alone fails with the reason.
        """
        key = samples[0].job.batch_key
        limit = self.scheduler.max_batch_size(key)
        survivors: list[Sample] = []
        for start in range(0, len(samples), limit):
            chunk = samples[start : start + limit]
            try:
                runner.step(chunk)
                self.metrics.batch_size.observe(len(chunk))
                survivors += chunk
            except torch.OutOfMemoryError:
                _empty_cache(runner.device)
                if len(chunk) == 1:
                    job = chunk[0].job
                    self._fail(
                        job.job_id, f"out of device memory even for one {job.width}x{job.height} image"
                    )
                    continue
                self.metrics.oom_splits.inc()
                self.scheduler.shrink(key, len(chunk) // 2)
                survivors += self._step(runner, chunk)
        return survivors

    def _start_decode(
        self, runner: SDRunner, model: LoadedModel, samples: list[Sample], batch_size: int
    ) -> _Decoding:
        started = time.perf_counter()
        try:
            pending = [runner.start_decode(samples)]
        except torch.OutOfMemoryError:
            _empty_cache(runner.device)
            pending = [_decode_alone(runner, s) for s in samples]  # one at a time, in stream order
        return _Decoding(samples, model, pending, batch_size, time.perf_counter() - started)

    def _deliver_decoded(self, decoding: list[_Decoding]) -> None:
        """Hand every decoded batch's images to their jobs (waiting for their copies to the host)."""
        while decoding:
            batch = decoding.pop(0)
            started = time.perf_counter()
            images = [image for pending in batch.pending for image in pending.result()]
            # The decode's own time: queuing it, and waiting for what the device had not done yet.
            decode_s = (batch.queue_s + time.perf_counter() - started) / len(batch.samples)
            for sample, image in zip(batch.samples, images, strict=True):
                sample.times["decode_s"] = decode_s
                self._deliver(
                    sample.job, image, batch.model, batch.batch_size, sample.times, sample.total_steps
                )

    def _run_flow(self, runner: FlowRunner, model: LoadedModel, batch: list[JobSpec]) -> None:
        # The batch key leaves out the sampler and the decoder: a job the model refuses fails alone.
        runnable = []
        for job in batch:
            if reason := runner.refusal(job):
                self._fail(job.job_id, reason)
            else:
                runnable.append(job)
        if not runnable:
            return
        batch = runnable

        def step_done(job_ids: list[str], step: int, total: int) -> bool:
            for job_id in job_ids:
                self._emit(ProgressEvent(job_id, JobStatus.RUNNING, step, total))
            return all(job_id in self._cancel_requested for job_id in job_ids)

        started = time.perf_counter()
        images = runner.run(batch, step_done)
        elapsed = time.perf_counter() - started
        for job, image in zip(batch, images, strict=True):
            if not self._drop_if_canceled(job.job_id):
                self._deliver(job, image, model, len(batch), {"denoise_s": elapsed}, job.steps)


def _decode_alone(runner: SDRunner, sample: Sample) -> PendingImages:
    """One image's decode; where even that runs out of device memory (a 2048² SDXL image on a small
    GPU), the VAE's tiled decode: a tile's memory instead of the image's."""
    try:
        return runner.start_decode([sample])
    except torch.OutOfMemoryError:
        _empty_cache(runner.device)
        log.info(
            "decoding a %dx%d image in tiles: out of device memory at once",
            sample.job.width,
            sample.job.height,
        )
        return runner.start_decode([sample], tiled=True)


def _simulated_decode_oom(limit: int, pixels: int, tiled: bool) -> None:
    """The ``fault_oom_decode_above_pixels`` hook: a device with room for ``limit`` pixels of an
    untiled decode (a tiled one always fits)."""
    if not tiled and pixels > limit:
        raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: a decode of {pixels} pixels > {limit})")


def _simulated_oom(limit: int, rows: int) -> None:
    """The ``fault_oom_above_rows`` hook: a device with room for ``limit`` UNet rows."""
    if rows > limit:
        raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {rows} rows > {limit})")


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
