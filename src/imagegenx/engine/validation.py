"""Checks a job must pass before it is queued: clear reasons, no torch needed."""

from __future__ import annotations

import math

from imagegenx.config import EngineSettings
from imagegenx.types import JobSpec, Task, UserError

TINY_SIZE_RANGE = (32, 1024)  # random:tiny-* models exist for tests; real models use the settings' range
MAX_CONTROLS = 4
DECODERS = ("full", "tiny")


def validate_job(job: JobSpec, settings: EngineSettings) -> None:
    """Raise ``UserError`` naming the first thing wrong with ``job``."""
    low, high = (
        TINY_SIZE_RANGE if job.model.startswith("random:tiny-") else (settings.min_size, settings.max_size)
    )
    for name, value in (("width", job.width), ("height", job.height)):
        if value % 8:
            raise UserError(f"{name} {value} is not a multiple of 8")
        if not low <= value <= high:
            raise UserError(f"{name} {value} is outside {low}-{high}")
    if not 1 <= job.steps <= settings.max_steps:
        raise UserError(f"steps {job.steps} is outside 1-{settings.max_steps}")
    if not (math.isfinite(job.guidance_scale) and 0 <= job.guidance_scale <= 30):
        raise UserError(f"guidance scale {job.guidance_scale} is outside 0-30")
    if not 1 <= job.clip_skip <= 12:
        raise UserError(f"clip skip {job.clip_skip} is outside 1-12")
    if not 0 <= job.seed < 2**64:
        raise UserError(f"seed {job.seed} is outside 0-2^64")
    if job.decoder not in DECODERS:
        raise UserError(f"decoder {job.decoder!r} is not one of {', '.join(DECODERS)}")
    if job.task is not Task.TEXT2IMG:
        if job.init_image is None:
            raise UserError(f"{job.task} needs an input image")
        if not (math.isfinite(job.strength) and 0 < job.strength <= 1):
            raise UserError(f"strength {job.strength} is outside (0, 1]")
    if job.task is Task.INPAINT and job.mask_image is None:
        raise UserError("inpaint needs a mask image (white = repaint, black = keep)")
    names = [lora.name for lora in job.loras]
    if len(set(names)) != len(names):
        raise UserError("a LoRA is listed twice")
    for lora in job.loras:
        if not (math.isfinite(lora.weight) and 0 <= lora.weight <= 2):
            raise UserError(f"LoRA {lora.name!r} weight {lora.weight} is outside 0-2")
    if len(job.controls) > MAX_CONTROLS:
        raise UserError(f"at most {MAX_CONTROLS} ControlNets per image")
    for control in job.controls:
        if not (math.isfinite(control.strength) and 0 <= control.strength <= 2):
            raise UserError(f"ControlNet {control.model!r} strength {control.strength} is outside 0-2")
        if not control.image:
            raise UserError(f"ControlNet {control.model!r} has no control image")
    if job.identity is not None:
        if not (math.isfinite(job.identity.scale) and 0 <= job.identity.scale <= 2):
            raise UserError(f"identity scale {job.identity.scale} is outside 0-2")
        if not job.identity.embedding or not all(math.isfinite(v) for v in job.identity.embedding):
            raise UserError("the identity's face embedding is empty or not finite")
        if job.identity.identitynet and job.identity.identitynet not in {c.model for c in job.controls}:
            raise UserError(f"IdentityNet {job.identity.identitynet!r} is not among the job's ControlNets")
