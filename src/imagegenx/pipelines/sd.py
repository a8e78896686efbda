"""The engine's own denoising loop for the UNet families (SD 1.5, SD 2.x, SDXL base and refiner).

One ``SDRunner`` per loaded model. The engine calls, in order:

1. ``prepare(jobs)``: prompt embeddings, timesteps and initial latents, one ``Sample`` per job
   (text-to-image, img2img and inpaint all start here, from the same loaded components);
2. ``step(samples)``: one UNet call for every sample in the batch, each at its own timestep, then
   each sample's own scheduler step;
3. ``decode(samples)``: VAE decode of finished samples, NaN check, [0, 1] float images
   (``start_decode``: the same, brought to the host while the engine queues the next step).

It reproduces diffusers' pipelines (same seed and parameters, same image within tolerance), which
the tests check; what it adds is that samples with different prompts, seeds, guidance scales,
samplers, step counts and tasks share one UNet batch and can join or leave it at any step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from imagegenx.models.instantid import IdentityAdapter
from imagegenx.models.loader import LoadedModel
from imagegenx.models.speed import REGIONAL_BUCKET_STEP, batch_bucket, decode_dtype, parameter_dtype
from imagegenx.pipelines import decoding
from imagegenx.pipelines.batched import Run, guide, make_runs, scale_inputs, step_run
from imagegenx.pipelines.conditioning import ConditioningCache
from imagegenx.pipelines.control import control_residuals, prepare_controls
from imagegenx.pipelines.hostcopy import HostCopy, PendingImages, to_device
from imagegenx.pipelines.image_inputs import ImageInputs
from imagegenx.pipelines.prompts import PromptEmbeddings, PromptEncoder
from imagegenx.pipelines.sample import Sample
from imagegenx.pipelines.samplers import (
    config_key,
    make_timed_scheduler,
    step_kwargs_supported,
    strength_timesteps,
)
from imagegenx.types import JobSpec, Task, UserError

REFINER_AESTHETIC_SCORE = (6.0, 2.5)  # (cond, uncond): diffusers' defaults for the SDXL refiner


class NaNImageError(RuntimeError):
    """A sample's latents or pixels became NaN or infinite (for example an fp16 overflow)."""


class SDRunner:
    def __init__(self, model: LoadedModel) -> None:
        pipe = model.pipe
        self.model = model
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.device = model.device
        self.dtype = model.dtype
        self.family = model.family
        self.scale_factor = model.vae_scale_factor
        self.is_xl = self.family in {"sdxl", "sdxl-refiner"}
        self.nine_channel = self.unet.config.in_channels == 9
        self.distilled_guidance = self.unet.config.time_cond_proj_dim is not None
        self.compiled = "compile" in model.speedups
        # A regionally compiled UNet compiles a new batch shape in seconds: finer buckets, less padding.
        self.bucket_step = REGIONAL_BUCKET_STEP if model.speedups.get("compile_regional") else 0
        self.identity: IdentityAdapter | None = None  # InstantID adapter of the current batch
        # The SD VAEs overflow in fp16: bf16 or fp32 (the fast loader has cast it already, to warm it up)
        if (vae_dtype := decode_dtype(self.vae, self.device)) != self.vae.dtype:
            self.vae.to(vae_dtype)
        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        self.prompts = PromptEncoder(tokenizers, encoders, self.family)
        self.image_inputs = ImageInputs(
            self.vae, pipe.image_processor, self.scale_factor, self.nine_channel, self.dtype, self._noise
        )
        # The engine wants uint8 pixels: made on the device, a quarter of the bytes cross to the host
        # (16 SDXL images: 36 instead of 145 ms on an H200, benchmarks/2026-11-29b-vae-layout-h200.json).
        self.uint8_output = False
        # Test hooks (fault injection): called with the UNet's input batch size before each call, and
        # with the pixels and whether it is tiled before each full-VAE decode.
        self.before_unet: Callable[[int], None] | None = None
        self.before_decode: Callable[[int, bool], None] | None = None
        guidance_dim = self.unet.config.time_cond_proj_dim if self.distilled_guidance else None
        self.conditioning = ConditioningCache(self.device, self.dtype, self.is_xl, guidance_dim)
        self._time_ids_cache: dict[tuple, torch.Tensor] = {}

    # 1. Prepare ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def prepare(self, jobs: list[JobSpec], controlnets: list | None = None) -> list[Sample]:
        """``controlnets``: the loaded ControlNets of the jobs' batch key, in the key's order. Raises
        the first job's ``UserError``."""
        samples = self.prepare_each(jobs, [controlnets or []] * len(jobs))
        for sample in samples:
            if isinstance(sample, UserError):
                raise sample
        return samples  # type: ignore[return-value]

    @torch.inference_mode()
    def prepare_each(self, jobs: list[JobSpec], controlnets: list[list]) -> list[Sample | UserError]:
        """One sample per job, or the ``UserError`` that job raised (the others are still prepared).

        The text-to-image jobs' starting noise is drawn in one ``randn_tensor`` call with the list of
        their generators: it draws from each generator in turn, so each image gets the numbers its
        own draw would give, with one host-to-device copy and one scaling for all."""
        prepared: list[Sample | UserError] = []
        embeddings = self._encode_prompts(jobs)
        for job, nets in zip(jobs, controlnets, strict=True):
            try:
                prepared.append(self._prepare_one(job, nets, embeddings))
            except UserError as exc:
                prepared.append(exc)
        groups: dict[tuple, list[Sample]] = {}
        for sample in prepared:
            if isinstance(sample, Sample) and sample.job.task is Task.TEXT2IMG:
                groups.setdefault((self._latent_shape(sample.job), sample.schedule), []).append(sample)
        for (shape, _), group in groups.items():
            generators = [s.generator for s in group]
            size = (len(group), *shape[1:])
            noise = self._noise(size, generators)
            latents = noise * group[0].scheduler.init_noise_sigma  # one schedule: one sigma
            for i, sample in enumerate(group):
                sample.latents = latents[i : i + 1]
        return prepared

    def _noise(
        self, shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator]
    ) -> torch.Tensor:
        """Gaussian noise from the jobs' CPU generators (the same numbers on any device, as diffusers
        draws them), brought to the device without waiting for the kernels queued there: diffusers'
        own copy is a pageable one, which waited for the batch in flight before each batch began."""
        return to_device(
            randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=self.dtype),
            self.device,
        )

    def _latent_shape(self, job: JobSpec) -> tuple[int, int, int, int]:
        factor = self.scale_factor
        return (1, self.vae.config.latent_channels, job.height // factor, job.width // factor)

    def set_identity(self, adapter: IdentityAdapter | None, scale: float | None) -> None:
        """Identity attention on for the coming batch (InstantID), or off for a batch without one."""
        if adapter is not None:
            adapter.use(self.unet, scale)
        elif self.identity is not None:
            self.identity.use(self.unet, None)
        self.identity = adapter

    def _guided(self, job: JobSpec) -> bool:
        return job.guidance_scale > 1.0 and not self.distilled_guidance

    def _encode_prompts(self, jobs: list[JobSpec]) -> dict[tuple[str, int], PromptEmbeddings]:
        """Every job's prompts (and negative prompts where guided) encoded together; empty when that
        fails, so each job encodes its own in ``_prepare_one`` and the one at fault fails alone."""
        keys = [(job.prompt, job.clip_skip) for job in jobs]
        keys += [(job.effective_negative_prompt, job.clip_skip) for job in jobs if self._guided(job)]
        try:
            return self.prompts.encode_many(keys)
        except (ValueError, RuntimeError):
            return {}

    def _prepare_one(
        self, job: JobSpec, controlnets: list, embeddings: dict[tuple[str, int], PromptEmbeddings]
    ) -> Sample:
        started = time.perf_counter()
        if self.nine_channel and job.task is not Task.INPAINT:
            raise UserError(f"model {job.model!r} is an inpainting model: it only does inpaint tasks")
        if job.decoder == "tiny" and self.model.tiny_decoder is None:
            raise UserError(
                f"model {job.model!r} ({self.family}) has no tiny decoder: the server names none for "
                f"{self.family} in IMAGEGENX_MODELS__TINY_DECODERS"
            )
        generator = torch.Generator("cpu").manual_seed(job.seed)

        # 1a. Prompt embeddings (encoded for the whole batch, cached per prompt); guidance needs the
        # negative prompt too.
        def encoded(prompt: str) -> PromptEmbeddings:
            return embeddings.get((prompt, job.clip_skip)) or self.prompts.encode(prompt, job.clip_skip)

        cond = encoded(job.prompt)
        uncond = encoded(job.effective_negative_prompt) if self._guided(job) else None

        # 1b. Timesteps, shortened by ``strength`` for img2img and partial inpaint.
        config = self.model.pipe.scheduler.config
        scheduler = make_timed_scheduler(job.scheduler, config, job.steps, self.device)
        timesteps = scheduler.timesteps
        if job.task is not Task.TEXT2IMG:
            timesteps = strength_timesteps(scheduler, job.steps, job.strength)
        begin = getattr(scheduler, "begin_index", None)
        schedule = (job.scheduler, config_key(config), job.steps, len(timesteps), begin)

        sample = Sample(
            job,
            scheduler,
            timesteps,
            generator,
            latents=torch.empty(0),
            cond=cond.hidden,
            uncond=None if uncond is None else uncond.hidden,
            schedule=schedule,
        )
        if self.is_xl:
            self._add_xl_conditioning(sample, cond, uncond)
        if job.identity is not None:
            if self.identity is None:
                raise UserError("an identity needs its InstantID adapter loaded for the batch")
            embedding = torch.tensor([job.identity.embedding], device=self.device, dtype=self.dtype)
            if embedding.shape[1] != self.identity.embedding_dim:
                raise UserError(
                    f"the face embedding has {embedding.shape[1]} values; the InstantID adapter takes "
                    f"{self.identity.embedding_dim} (an ArcFace embedding)"
                )
            sample.identity = embedding
        if job.controls:
            if self.nine_channel:
                raise UserError("ControlNet does not work with 9-channel inpainting models")
            sample.controls = prepare_controls(job, controlnets, self.scale_factor, self.device, self.dtype)

        # 1c. Initial latents: pure noise (drawn by ``prepare_each``, for all jobs at once), or the
        # input image re-noised to the first timestep.
        shape = self._latent_shape(job)
        if job.task is Task.IMG2IMG:
            self.image_inputs.img2img(sample, shape)
        elif job.task is Task.INPAINT:
            self.image_inputs.inpaint(sample, shape)
        sample.times["encode_prompt_s"] = time.perf_counter() - started
        return sample

    def _add_xl_conditioning(self, sample: Sample, cond, uncond) -> None:
        job = sample.job
        size = [job.height, job.width]
        if self.family == "sdxl-refiner":
            cond_ids, uncond_ids = ([*size, 0, 0, score] for score in REFINER_AESTHETIC_SCORE)
        else:
            cond_ids = uncond_ids = [*size, 0, 0, *size]
        sample.cond_pooled = cond.pooled
        sample.cond_time_ids = self._time_ids(cond_ids)
        if uncond is not None:
            sample.uncond_pooled = uncond.pooled
            sample.uncond_time_ids = self._time_ids(uncond_ids)

    def _time_ids(self, ids: list) -> torch.Tensor:
        """One read-only (1, 6) tensor per distinct size: no host-to-device copy per image."""
        key = tuple(ids)
        tensor = self._time_ids_cache.get(key)
        if tensor is None:
            if len(self._time_ids_cache) >= 64:
                self._time_ids_cache.clear()
            tensor = torch.tensor([ids], device=self.device, dtype=self.dtype)
            self._time_ids_cache[key] = tensor
        return tensor

    # 2. Denoise ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, samples: list[Sample]) -> None:
        """Advance every sample by one step with a single UNet call.

        Consecutive samples with the same schedule and step share their scheduler calls and their
        guidance arithmetic (``pipelines.batched``: the same numbers as one call per sample)."""
        runs = make_runs(samples)
        noise_pred = self._unet(samples, runs)
        row = 0
        for run in runs:
            prediction = guide(run, noise_pred[row : row + run.rows])
            row += run.rows
            if len(run.samples) == 1:
                self._scheduler_step(run.lead, prediction)
            else:
                step_run(run, prediction)

    def _unet(self, samples: list[Sample], runs: list[Run]) -> torch.Tensor:
        inputs, timesteps = [], []
        for run in runs:
            x = scale_inputs(run)
            if self.nine_channel:  # inpaint samples, which always run alone
                x = torch.cat([x, run.lead.mask, run.lead.masked_image_latents], dim=1)
            if run.lead.guided:
                x = x.repeat_interleave(2, dim=0)  # each sample's rows: uncond, cond
            inputs.append(x)
            timesteps.append(run.lead.timesteps[run.lead.index].reshape(1).float().expand(len(x)))
        rows = sum(len(x) for x in inputs)
        controls = [s.controls for s in samples for _ in range(s.rows)]
        # compiled: a few static shapes, so the batch is padded to its bucket with copies of the last row
        padded = batch_bucket(rows, self.bucket_step) if self.compiled else rows
        cond = self.conditioning.get(samples, padded, self.identity)
        if padded > rows:
            inputs.append(inputs[-1][-1:].expand(padded - rows, *inputs[-1].shape[1:]))
            timesteps.append(timesteps[-1][-1:].expand(padded - rows))
            controls += [[replace(c, strength=0.0) for c in controls[-1]]] * (padded - rows)
        kwargs = {}
        if self.is_xl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}
        if cond.timestep_cond is not None:
            kwargs["timestep_cond"] = cond.timestep_cond
        # Each run's timesteps where its scheduler keeps them (LCM's and DDIM's on the host, others on
        # the device: a batch may mix them), brought over without waiting.
        x, t = torch.cat(inputs), torch.cat([to_device(ts, self.device) for ts in timesteps])
        tokens = None
        if cond.faces is not None:
            tokens = self.identity.tokens(cond.faces)
            added = kwargs.setdefault("added_cond_kwargs", {})
            added["image_embeds"] = [cond.faces[:, None, None, :]]
        if controls[0]:
            control_kwargs = {
                k: v for k, v in kwargs.get("added_cond_kwargs", {}).items() if k != "image_embeds"
            }
            down, mid = control_residuals(controls, x, t, cond.encoder_states, control_kwargs or None, tokens)
            kwargs |= {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        if self.before_unet is not None:
            self.before_unet(len(x))
        return self.unet(
            x,
            t,
            encoder_hidden_states=cond.encoder_states,
            encoder_attention_mask=cond.attention_mask,
            return_dict=False,
            **kwargs,
        )[0][:rows]

    def _scheduler_step(self, sample: Sample, prediction: torch.Tensor) -> None:
        scheduler, t = sample.scheduler, sample.timesteps[sample.index]
        extra = {}
        supported = step_kwargs_supported(type(scheduler))
        if "generator" in supported:
            extra["generator"] = sample.generator
        if "eta" in supported:
            extra["eta"] = 0.0
        sample.latents = scheduler.step(prediction, t, sample.latents, return_dict=False, **extra)[0]
        if sample.mask is not None and not self.nine_channel:
            # Keep the unmasked area on the original image, re-noised to the next timestep.
            kept = sample.image_latents
            if sample.index + 1 < sample.total_steps:
                next_t = sample.timesteps[sample.index + 1].reshape(1)
                kept = scheduler.add_noise(kept, sample.noise, next_t)
            sample.latents = (1 - sample.mask) * kept + sample.mask * sample.latents
        sample.index += 1

    # 3. Decode ----------------------------------------------------------------------------------

    def decode(self, samples: list[Sample]) -> list[np.ndarray | None]:
        """HxWx3 images, [0, 1] floats (uint8 when ``uint8_output`` is set); ``None`` for a sample
        whose output is not finite."""
        return self.start_decode(samples).result()

    @torch.inference_mode()
    def start_decode(self, samples: list[Sample], tiled: bool = False) -> PendingImages:
        """``decode``, queued: the images come to the host while the caller queues more work.
        ``tiled``: the full VAE decodes in tiles (for an image too large for the device at once)."""
        # One decoder call per decoder the samples asked for (``JobSpec.decoder``), back in their
        # order. Each part becomes new tensors at once: under CUDA graphs a decoder's output memory is
        # the graph's own, and the next graph to run (the other decoder's) may write over it.
        order: list[int] = []
        images: list[torch.Tensor] = []
        finite: list[torch.Tensor] = []
        for name, decoder in (("full", self.vae), ("tiny", self.model.tiny_decoder)):
            picked = [i for i, s in enumerate(samples) if s.job.decoder == name]
            if picked:
                latents = torch.cat([samples[i].latents for i in picked]).to(parameter_dtype(decoder))
                with decoding.tiled(decoder, tiled and name == "full", self.scale_factor):
                    if name == "full" and self.before_decode is not None:
                        self.before_decode(
                            len(picked) * latents.shape[2] * latents.shape[3] * self.scale_factor**2, tiled
                        )
                    pixels = decoder.decode(latents / decoder.config.scaling_factor, return_dict=False)[0]
                finite.append(torch.isfinite(pixels).flatten(1).all(dim=1))
                images.append(decoding.output_pixels(pixels, self.uint8_output))
                order += picked
        if len(images) > 1:
            images = [decoding.in_order(torch.cat(images), order)]
            finite = [decoding.in_order(torch.cat(finite), order)]
        return PendingImages(HostCopy(images[0]), HostCopy(finite[0]))
