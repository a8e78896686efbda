"""A cheap look at an image while it denoises: its latents projected to RGB by one fixed 4x3 matrix
(no VAE decode, no extra model), encoded as a small JPEG for progress events.

The matrices are linear fits of the SD 1.5 (also SD 2.x: the same VAE) and SDXL VAEs, as published
with ComfyUI's latent previews (``comfy/latent_formats.py``, "latent_rgb_factors"). They read the
latents the UNet sees; early steps are mostly noise, the picture settles as the steps go on.

With ``preview_decoder="tiny"`` (EngineSettings) and a tiny decoder for the model's family
(models/tiny_decoder.py), the latents are decoded by it instead, as A1111's TAESD live previews:
a real picture at preview size for one small decode per preview.

``PendingPreviews`` makes them without stalling the device: the projection is queued on the device
with a ``HostCopy`` (hostcopy.py), and the JPEG is made once the copy has completed, for a later
progress event of the same job.
"""

from __future__ import annotations

import functools
import io
import logging
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from imagegenx.models.speed import parameter_dtype
from imagegenx.pipelines.hostcopy import HostCopy

_SD15 = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]
_SDXL = [
    [0.3920, 0.4054, 0.4549],
    [-0.2634, -0.0196, 0.0653],
    [0.0568, 0.1687, -0.0755],
    [-0.3112, -0.2359, -0.2076],
]
RGB_FACTORS = {"sd15": _SD15, "sd21": _SD15, "sdxl": _SDXL, "sdxl-refiner": _SDXL}
MAX_SIDE = 128  # pixels: a 1024² image's latents are 128² already
PREVIEWS_PER_JOB = 8

log = logging.getLogger("imagegenx.preview")


def preview_due(step: int, total: int) -> bool:
    """Fewer than PREVIEWS_PER_JOB previews per job, evenly spaced, never on the last step (the
    image itself follows)."""
    return 0 < step < total and step % -(-total // PREVIEWS_PER_JOB) == 0


@torch.no_grad()
def latent_preview(latents: torch.Tensor, family: str) -> bytes | None:
    """JPEG bytes of ``latents`` (1, 4, h, w) seen through the family's RGB factors; None for
    families without factors (SD 3.5, Flux: 16 channels). Blocks until the device is done."""
    pixels = _project(latents, family)
    return None if pixels is None else _jpeg(pixels.cpu())


class PendingPreviews:
    """Previews on their way from the device, at most one per job (a newer one replaces it).

    ``start`` queues the work and returns at once; ``ready`` hands over the finished ones (it only
    asks the events, never waits); ``drop`` forgets a job's preview (its image follows instead).
    The JPEGs are the same as ``latent_preview``'s for the same latents.
    """

    def __init__(self) -> None:
        self._pending: dict[str, HostCopy] = {}

    def __len__(self) -> int:
        return len(self._pending)

    @torch.no_grad()
    def start(self, job_id: str, latents: torch.Tensor, family: str, decoder: Any = None) -> None:
        """``decoder``: a tiny decoder to decode the latents with, instead of the RGB factors."""
        pixels = _project(latents, family) if decoder is None else _decode_small(latents, decoder)
        if pixels is not None:
            self._pending[job_id] = HostCopy(pixels)

    def ready(self) -> dict[str, bytes]:
        """The previews whose copies have completed, by job id; they leave the pending map."""
        done: dict[str, bytes] = {}
        for job_id, copy in list(self._pending.items()):
            if not copy.done():
                continue
            del self._pending[job_id]
            try:
                done[job_id] = _jpeg(copy.wait())
            except Exception:  # costs the preview, never the job
                log.exception("step preview of %s failed", job_id)
        return done

    def drop(self, job_id: str) -> None:
        self._pending.pop(job_id, None)


def _project(latents: torch.Tensor, family: str) -> torch.Tensor | None:
    """(h, w, 3) uint8 pixels on the latents' device, or None for families without factors."""
    factors = RGB_FACTORS.get(family)
    if factors is None or latents.shape[1] != len(factors):
        return None
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), _matrix(family, latents.device))
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)


def _decode_small(latents: torch.Tensor, decoder: Any) -> torch.Tensor:
    """(h, w, 3) uint8 pixels of the first latent decoded by ``decoder``, shrunk on the device to
    at most MAX_SIDE a side (a small copy to the host)."""
    z = latents[:1].to(parameter_dtype(decoder)) / decoder.config.scaling_factor
    image = decoder.decode(z, return_dict=False)[0].float()
    scale = MAX_SIDE / max(image.shape[-2:])
    if scale < 1:
        image = F.interpolate(image, scale_factor=scale, mode="area")
    return ((image[0] + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)


@functools.cache
def _matrix(family: str, device: torch.device) -> torch.Tensor:
    """The factors on ``device``, made once: a fresh host-to-device copy would wait for the stream."""
    return torch.tensor(RGB_FACTORS[family], device=device, dtype=torch.float32)


def _jpeg(pixels: torch.Tensor) -> bytes:
    """A small JPEG of (h, w, 3) uint8 host pixels, at most MAX_SIDE a side."""
    image = Image.fromarray(pixels.numpy())
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75)
    return buffer.getvalue()
