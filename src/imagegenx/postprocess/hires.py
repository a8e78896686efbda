"""Second passes over finished images, both img2img through the engine:

- hires fix (seed 004, A1111's "hires fix"): the first pass ran at the requested size; upscale it by
  ``hires_scale`` (Lanczos or Real-ESRGAN), then re-denoise at strength ≈ 0.35 with the same
  model, prompt and seed, so detail is added at the larger size without changing the composition;
- refiner (seed 000's "refine the top-k ~10 steps"; SDXL's refiner): img2img with a refiner model at
  low strength, on every image or only on the best ``refine_top_k`` by the QC rank.

Step counts are what actually runs: img2img at strength s over N scheduled steps runs about s·N,
so N = ceil(steps / s). Each pass's jobs go to the engine together and share its batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from PIL import Image

from imagegenx.postprocess.encode import to_pil
from imagegenx.types import GeneratedImage, JobSpec, SchedulerName, Task
from imagegenx.vision.imagefile import encode_in_process

if TYPE_CHECKING:
    from imagegenx.postprocess.chain import Denoiser, PostprocessSpec


def img2img_job(
    job: JobSpec, pil: Image.Image, *, suffix: str, strength: float, steps_run: int, **changes
) -> JobSpec:
    """``job`` turned into an img2img pass over ``pil`` that runs about ``steps_run`` steps. The pass
    decodes with the full VAE: hires, refine and fix passes exist for quality, while a tiny decoder
    (``JobSpec.decoder``) only sped up the image they start from."""
    return replace(
        job,
        task=Task.IMG2IMG,
        width=pil.width,
        height=pil.height,
        strength=strength,
        steps=max(1, math.ceil(steps_run / strength)),
        init_image=encode_in_process(pil),
        mask_image=None,
        job_id=f"{job.job_id}:{suffix}" if job.job_id else "",
        **({"decoder": "full"} | changes),
    )


def run_passes(
    images: Sequence[GeneratedImage],
    jobs: Sequence[JobSpec | None],
    denoiser: Denoiser,
    what: str,
    record: dict,
) -> list[GeneratedImage]:
    """Run the jobs (``None``: leave that image as it is) together; put each result's pixels into
    its image, keeping the original job for the metadata; a failed pass marks its image's error."""
    todo = [(i, job) for i, job in enumerate(jobs) if job is not None]
    results = denoiser.run([job for _, job in todo])
    out = list(images)
    for (i, job), result in zip(todo, results, strict=True):
        if isinstance(result, Exception):
            out[i] = replace(out[i], post={**out[i].post, "error": f"{what} failed: {result}"})
            continue
        post = {**out[i].post, what: record | {"steps": job.steps, "batch_size": result.batch_size}}
        out[i] = replace(out[i], width=result.width, height=result.height, rgb=result.rgb, post=post)
    return out


def hires_fix(
    images: Sequence[GeneratedImage], spec: PostprocessSpec, denoiser: Denoiser
) -> list[GeneratedImage]:
    # 1. Upscale the first pass to the target size (a multiple of 8, as the UNet needs).
    pils = [to_pil(image) for image in images]
    sizes = [
        (_multiple_of_8(p.width * spec.hires_scale), _multiple_of_8(p.height * spec.hires_scale))
        for p in pils
    ]
    if spec.hires_upscaler == "realesrgan":
        from imagegenx.postprocess.upscale import Upscale, upscaler_options

        factor = 2 if spec.hires_scale <= 2 else 4
        upscale = Upscale(**upscaler_options(denoiser))
        big = upscale.apply(pils, {"scale": factor, "network_strength": 1.0})
        pils = [b.resize(size, Image.Resampling.LANCZOS) for b, size in zip(big, sizes, strict=True)]
    else:
        pils = [p.resize(size, Image.Resampling.LANCZOS) for p, size in zip(pils, sizes, strict=True)]
    # 2. Re-denoise at low strength with the same model, prompt and seed.
    jobs = [
        img2img_job(
            image.job, pil, suffix="hires", strength=spec.hires_strength, steps_run=_hires_steps(image, spec)
        )
        for image, pil in zip(images, pils, strict=True)
    ]
    record = {"scale": spec.hires_scale, "strength": spec.hires_strength, "upscaler": spec.hires_upscaler}
    return run_passes(images, jobs, denoiser, "hires", record)


def refine(
    images: Sequence[GeneratedImage], spec: PostprocessSpec, denoiser: Denoiser
) -> list[GeneratedImage]:
    """The refiner pass on every image, or on the best ``refine_top_k`` by QC rank (1 = best)."""
    assert spec.refiner is not None
    k = spec.refine_top_k

    def chosen(image: GeneratedImage) -> bool:
        rank = image.post.get("qc", {}).get("rank")
        return k is None or (rank is not None and rank <= k)

    jobs = [
        img2img_job(
            image.job,
            to_pil(image),
            suffix="refine",
            strength=spec.refiner_strength,
            steps_run=spec.refiner_steps,
            model=spec.refiner,
            loras=(),  # the base model's LoRAs do not fit the refiner's UNet
            # LCM works only with an LCM-distilled UNet or LoRA, which the refiner does not have
            scheduler=SchedulerName.DPMPP_2M_KARRAS
            if image.job.scheduler is SchedulerName.LCM
            else image.job.scheduler,
        )
        if chosen(image)
        else None
        for image in images
    ]
    record = {"model": spec.refiner, "strength": spec.refiner_strength}
    return run_passes(images, jobs, denoiser, "refine", record)


def _hires_steps(image: GeneratedImage, spec: PostprocessSpec) -> int:
    if spec.hires_steps is not None:
        return spec.hires_steps
    return max(1, round(image.job.steps * spec.hires_strength))  # as many steps as the same strength would


def _multiple_of_8(value: float) -> int:
    return max(8, round(value / 8) * 8)
