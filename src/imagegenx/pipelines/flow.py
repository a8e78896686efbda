"""SD 3.5 and Flux: diffusers' own pipelines, batched per group of equal step count and guidance.

The engine's loop covers the UNet families; these transformer families run through diffusers'
``__call__`` until the loop covers them. Per-image seeds still hold (one generator per image).
Cancelling one image stops its group at the next step only when every image of the group is
cancelled; otherwise its result is discarded when the group finishes.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby

import numpy as np
import torch

from imagegenx.models.loader import LoadedModel
from imagegenx.models.speed import parameter_dtype
from imagegenx.pipelines import decoding
from imagegenx.types import JobSpec, SchedulerName, UserError

# step_done(job_ids, step, total) -> True when every job of the group is cancelled.
StepCallback = Callable[[list[str], int, int], bool]


class FlowRunner:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.pipe = model.pipe

    def refusal(self, job: JobSpec) -> str | None:
        """Why this model cannot run ``job`` (its sampler, its decoder), or None."""
        family = self.model.family
        if job.scheduler is not SchedulerName.EULER:
            return (
                f"{family} models sample with their own flow-matching Euler scheduler; "
                f"use scheduler 'euler' (got {job.scheduler.value!r})"
            )
        if job.decoder == "tiny" and self.model.tiny_decoder is None:
            return (
                f"model {job.model!r} ({family}) has no tiny decoder: the server names none "
                f"for {family} in IMAGEGENX_MODELS__TINY_DECODERS"
            )
        return None

    def run(self, jobs: list[JobSpec], step_done: StepCallback) -> list[np.ndarray | None]:
        """[0, 1] float images in the order of ``jobs``; ``None`` where the output is not finite.
        Raises ``UserError`` for the first job the model refuses (``refusal``)."""
        for job in jobs:
            if reason := self.refusal(job):
                raise UserError(reason)
        results: dict[str, np.ndarray | None] = {}

        def group_key(job: JobSpec):
            return (job.steps, job.guidance_scale)

        for _, group_iter in groupby(sorted(jobs, key=group_key), key=group_key):
            group = list(group_iter)
            for job, image in zip(group, self._run_group(group, step_done), strict=True):
                results[job.job_id] = image
        return [results[job.job_id] for job in jobs]

    @torch.inference_mode()
    def _run_group(self, jobs: list[JobSpec], step_done: StepCallback) -> list[np.ndarray | None]:
        first = jobs[0]
        ids = [job.job_id for job in jobs]

        def on_step(pipe, i, t, callback_kwargs):
            if step_done(ids, i + 1, first.steps):
                pipe._interrupt = True
            return callback_kwargs

        kwargs = {}
        if self.model.family == "sd3":
            kwargs["negative_prompt"] = [job.effective_negative_prompt for job in jobs]
        # With a tiny decoder among the jobs the pipeline stops at the latents and each decoder takes
        # its own; otherwise diffusers decodes as usual.
        tiny = any(job.decoder == "tiny" for job in jobs)
        out = self.pipe(
            prompt=[job.prompt for job in jobs],
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
            output_type="latent" if tiny else "np",
            callback_on_step_end=on_step,
            **kwargs,
        )
        images = self._decode(out.images, jobs) if tiny else out.images
        return [img if np.isfinite(img).all() else None for img in images]

    def _decode(self, latents: torch.Tensor, jobs: list[JobSpec]) -> list[np.ndarray]:
        """HxWx3 [0, 1] images of the pipeline's latents, each by its job's decoder, as diffusers'
        own decode does it (Flux's packed latents unpacked, then scaled and shifted)."""
        first = jobs[0]
        if self.model.family == "flux":
            factor = self.pipe.vae_scale_factor
            latents = self.pipe._unpack_latents(latents, first.height, first.width, factor)
        images: list[np.ndarray] = [np.empty(0)] * len(jobs)
        for name, decoder in (("full", self.pipe.vae), ("tiny", self.model.tiny_decoder)):
            picked = [i for i, job in enumerate(jobs) if job.decoder == name]
            if not picked:
                continue
            config = decoder.config
            z = latents[picked].to(parameter_dtype(decoder)) / config.scaling_factor
            z = z + (config.shift_factor or 0.0)
            pixels = decoding.output_pixels(decoder.decode(z, return_dict=False)[0], uint8=False)
            for i, image in zip(picked, pixels.cpu().numpy(), strict=True):
                images[i] = image
        return images
