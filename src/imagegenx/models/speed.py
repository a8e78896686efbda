"""Speed-ups applied to a loaded model's components, each a setting so it can be measured on and off.

- ``channels_last``: NHWC memory format for the UNet's convolutions; cuDNN then uses tensor cores
  without layout transposes (on by default on CUDA, where it helps; off on the CPU). Not for the VAE:
  its GroupNorms copy NHWC activations back and forth, and an SDXL 1024² decode was 25% slower in
  channels_last on an H200 (benchmarks/2026-11-29b-vae-layout-h200.json).
- ``fuse_qkv``: one projection for attention's q, k and v (diffusers' ``fuse_qkv_projections``).
  Off by default: LoRAs target ``to_q``/``to_k``/``to_v`` and a fused model cannot take them.
- ``compile``: ``torch.compile`` of the UNet (``default``, ``reduce-overhead`` for CUDA graphs, or
  ``max-autotune``). Static shapes: the engine pads each UNet batch to a bucket (1, 2, 4, 8, ... rows)
  so a handful of graphs serve every batch size; compiled kernels persist in Inductor's on-disk
  cache (``TORCHINDUCTOR_CACHE_DIR``), so a restart does not compile again from scratch.
- ``compile_vae``: with ``compile`` on, the VAE decode is compiled too, its batch padded to the same
  buckets (it is 40% of an SDXL 1024² LCM-4 image on an H200, and runs at 15% of the matmul peak
  eager: GroupNorm and SiLU between the convolutions are memory-bound, which fusion helps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from imagegenx.config import ModelSettings


def batch_bucket(rows: int) -> int:
    """The padded UNet batch for ``rows`` rows when the UNet is compiled: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


def apply_speedups(pipe: Any, device: torch.device, settings: ModelSettings) -> dict[str, Any]:
    """Apply the configured speed-ups to ``pipe``'s components; returns what was applied."""
    applied: dict[str, Any] = {}
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    channels_last = settings.channels_last if settings.channels_last is not None else device.type == "cuda"
    if channels_last:
        unet = getattr(pipe, "unet", None)
        if unet is not None:
            unet.to(memory_format=torch.channels_last)
            applied["channels_last"] = True
    if settings.fuse_qkv and denoiser is not None and hasattr(denoiser, "fuse_qkv_projections"):
        denoiser.fuse_qkv_projections()
        applied["fuse_qkv"] = True
    if settings.compile != "off" and denoiser is not None:
        # Each bucket and resolution is its own graph: allow more of them than Dynamo's default 8.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        denoiser.forward = torch.compile(denoiser.forward, mode=settings.compile, dynamic=False)
        applied["compile"] = settings.compile
        vae = getattr(pipe, "vae", None)
        if settings.compile_vae and vae is not None:
            vae.decode = padded_decode(torch.compile(vae.decode, mode=settings.compile, dynamic=False))
            applied["compile_vae"] = True
    return applied


def padded_decode(decode: Callable[..., Any]) -> Callable[..., Any]:
    """``vae.decode`` with the batch padded to its bucket (copies of the last latent), so a compiled
    decode sees a few static shapes; the padding rows are cut off the result."""

    def decode_padded(z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        rows = z.shape[0]
        extra = batch_bucket(rows) - rows
        if extra:
            z = torch.cat([z, z[-1:].expand(extra, *z.shape[1:])])
        pixels = decode(z, return_dict=False, **kwargs)[0][:rows]
        if not return_dict:
            return (pixels,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=pixels)

    return decode_padded
