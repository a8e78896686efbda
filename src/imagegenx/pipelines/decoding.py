"""The latent decode's helpers (``SDRunner.start_decode``, pipelines/sd.py's step 3): a decoder's
output as pixels, a batch split by decoder put back in the samples' order, and diffusers' tiled
decode switched on for one call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

TILE_PIXELS = 512  # the tiled decode's tiles (a quarter of each overlapping its neighbours, blended)


def output_pixels(pixels: torch.Tensor, uint8: bool) -> torch.Tensor:
    """NHWC images in [0, 1] (uint8 where asked) from a decoder's NCHW [-1, 1]."""
    images = (pixels.float() / 2 + 0.5).clamp(0, 1)
    if uint8:  # rounded as diffusers' numpy_to_pil does, on the device
        images = (images * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1)


@contextlib.contextmanager
def tiled(vae: Any, on: bool, scale_factor: int) -> Iterator[None]:
    """diffusers' tiled decode for ``vae`` while the block runs (where ``on``): each tile decoded
    alone and the overlaps blended, so the memory is a tile's, not the image's."""
    if not on or not hasattr(vae, "use_tiling"):
        yield
        return
    saved = vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = (
        True,
        TILE_PIXELS,
        TILE_PIXELS // scale_factor,
    )
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved


def in_order(rows: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``rows`` (row k belongs to sample ``order[k]``) back in the samples' order."""
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return rows[inverse.to(rows.device)]
