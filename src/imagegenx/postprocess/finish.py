"""The upscaler's finish (Lanczos resize, blend with a plain Lanczos upscale, unsharp mask) in torch,
on the device the network ran on.

On a GPU the network turns a 1024² image into 4096² in about 0.5 s, while Pillow needs about 1.7 s
more on the CPU for the same finish at 4096² (benchmarks/2026-11-29-postprocess-h200.json). Here
the finish is a few matrix products on the GPU:

- Lanczos-3 resampling with Pillow's own coefficients (the same window, normalisation and
  horizontal-then-vertical order with 8-bit rounding in between), written as one (out × in) matrix
  per axis, so the result matches ``Image.resize(..., LANCZOS)`` to within a level or so of
  fixed-point rounding;
- the unsharp mask ``x + amount · (x − gaussian(x, radius))`` with a true Gaussian (Pillow uses a
  box-blur approximation of it: results differ by a level or two on edges).

On the CPU, Pillow's separable integer code is faster than dense matrices: the upscaler uses Pillow
there, and this module only on GPUs (the tests compare the two on the CPU).
"""

from __future__ import annotations

import functools
import math

import torch
from torch.nn import functional as F

LANCZOS_SUPPORT = 3.0


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    """sinc(x)·sinc(x/3) on |x| < 3, as Pillow's ``lanczos_filter``."""
    return torch.where(x.abs() < LANCZOS_SUPPORT, torch.sinc(x) * torch.sinc(x / LANCZOS_SUPPORT), 0.0)


@functools.lru_cache(maxsize=32)
def lanczos_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) float32 weights of a Lanczos resize, computed as Pillow's ``precompute_coeffs``."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)  # downscaling widens the filter
    support = LANCZOS_SUPPORT * filterscale
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    xmin = (centre - support + 0.5).floor().clamp(min=0)
    xmax = (centre + support + 0.5).floor().clamp(max=n_in)
    x = torch.arange(n_in, dtype=torch.float64)
    weights = _lanczos((x[None, :] - centre[:, None] + 0.5) / filterscale)
    weights = weights * ((x[None, :] >= xmin[:, None]) & (x[None, :] < xmax[:, None]))
    weights = weights / weights.sum(dim=1, keepdim=True)
    return weights.to(device=device, dtype=torch.float32)


def resize_lanczos(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) float 0-255 → (C, h, w) with ``size = (w, h)``, rounded to integers like Pillow's."""
    height, width = image.shape[1:]
    out_w, out_h = size
    x = image
    if out_w != width:  # horizontal pass first, rounded to 8 bits as Pillow does
        x = (x @ lanczos_matrix(width, out_w, image.device).T).round().clamp(0, 255)
    if out_h != height:
        x = (lanczos_matrix(height, out_h, image.device) @ x).round().clamp(0, 255)
    return x


def unsharp_mask(image: torch.Tensor, radius: float = 2.0, amount: float = 1.2) -> torch.Tensor:
    """(C, H, W) float 0-255 sharpened: ``x + amount · (x − gaussian(x, σ = radius))``, clamped."""
    half = max(1, math.ceil(3 * radius))
    taps = torch.arange(-half, half + 1, device=image.device, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * radius**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    x = image[:, None]  # (C, 1, H, W): each channel blurred on its own
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, half, half), mode="reflect"), kernel.view(1, 1, -1, 1))
    blurred = x.view(channels, *image.shape[1:]).round()
    return (image + amount * (image - blurred)).round().clamp(0, 255)


def finish(
    network: torch.Tensor,
    original: torch.Tensor,
    size: tuple[int, int],
    network_strength: float,
    sharpen: bool,
) -> torch.Tensor:
    """The network's (H, W, 3) uint8 output and the (h, w, 3) uint8 input, both on the device →
    the finished (size[1], size[0], 3) uint8 image, still on the device."""
    result = resize_lanczos(network.permute(2, 0, 1).float(), size)
    if network_strength < 1.0:
        plain = resize_lanczos(original.permute(2, 0, 1).float(), size)
        result = (network_strength * result + (1 - network_strength) * plain).round()
    if sharpen:
        result = unsharp_mask(result)
    return result.to(torch.uint8).permute(1, 2, 0)
