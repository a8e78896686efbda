"""The per-image state of the engine's denoising loop.

A ``Sample`` is one image on its way: its own scheduler, generator, prompt embeddings and latents.
Nothing in it depends on which other samples share its UNet batch, which is what makes an image
depend only on its own seed and parameters, and lets samples join and leave a batch at any step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from imagegenx.types import JobSpec
from imagegenx.vision.imagefile import IN_PROCESS_FORMATS, decode_image


@dataclass
class Sample:
    job: JobSpec
    scheduler: object
    timesteps: torch.Tensor
    generator: torch.Generator
    latents: torch.Tensor  # (1, C, h, w)
    cond: torch.Tensor  # (1, L, D) prompt embeddings
    uncond: torch.Tensor | None  # None: no classifier-free guidance for this image
    cond_pooled: torch.Tensor | None = None  # SDXL only
    uncond_pooled: torch.Tensor | None = None
    cond_time_ids: torch.Tensor | None = None  # SDXL micro-conditioning
    uncond_time_ids: torch.Tensor | None = None
    # inpaint: original image latents, the noise they are re-noised with, and the latent-size mask
    image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    masked_image_latents: torch.Tensor | None = None  # 9-channel inpainting UNets only
    controls: list = field(default_factory=list)  # pipelines.control.SampleControl, one per ControlNet
    identity: torch.Tensor | None = None  # (1, dim) InstantID face embedding
    # (sampler, scheduler config, steps, first step): samples with equal schedules at the same index
    # hold the same scheduler state, so they can share scheduler calls (pipelines.batched)
    schedule: tuple | None = None
    index: int = 0
    canceled: bool = False
    times: dict[str, float] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    @property
    def rows(self) -> int:
        """UNet batch rows this sample needs: uncond + cond with guidance, cond alone without."""
        return 2 if self.guided else 1


def decode_input_image(data: bytes, what: str, mode: str = "RGB") -> Image.Image:
    """A job's image through the one hardened decoder (caps, formats); bad bytes are a UserError.
    Uploads were held to PNG, JPEG and WebP at the API; the passes' own images come as raw PPM."""
    return decode_image(data, what, mode=mode, formats=IN_PROCESS_FORMATS)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8, rounded as diffusers' numpy_to_pil does (uint8 passes through)."""
    if images.dtype == np.uint8:
        return images
    return (images * 255).round().astype(np.uint8)
