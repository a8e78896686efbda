"""A cheap look at an image while it denoises: its latents projected to RGB by one fixed 4x3 matrix
(no VAE decode, no extra model), encoded as a small JPEG for progress events.

The matrices are linear fits of the SD 1.5 (also SD 2.x: the same VAE) and SDXL VAEs, as published
with ComfyUI's latent previews (``comfy/latent_formats.py``, "latent_rgb_factors"). They read the
latents the UNet sees; early steps are mostly noise, the picture settles as the steps go on.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

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


def preview_due(step: int, total: int) -> bool:
    """Fewer than PREVIEWS_PER_JOB previews per job, evenly spaced, never on the last step (the
    image itself follows)."""
    return 0 < step < total and step % -(-total // PREVIEWS_PER_JOB) == 0


@torch.no_grad()
def latent_preview(latents: torch.Tensor, family: str) -> bytes | None:
    """JPEG bytes of ``latents`` (1, 4, h, w) seen through the family's RGB factors; None for
    families without factors (SD 3.5, Flux: 16 channels)."""
    factors = RGB_FACTORS.get(family)
    if factors is None or latents.shape[1] != len(factors):
        return None
    matrix = torch.tensor(factors, device=latents.device, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), matrix)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).cpu().numpy()
    image = Image.fromarray(pixels)
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75)
    return buffer.getvalue()
