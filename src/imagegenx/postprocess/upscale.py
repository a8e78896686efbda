"""Real-ESRGAN x4plus upscaling with a PyTorch RRDBNet of our own (``postprocess/rrdbnet.py``, its
dense blocks fused), its weights read from the ncnn model files (``postprocess/esrgan_weights.py``).

Upscaling runs batched over tiles (``tile`` pixels, each read with ``overlap`` pixels of context
that are cropped away from the output), fp16 on a GPU and fp32 on the CPU. ×2 runs the ×4 network
then a Lanczos downscale, as Real-ESRGAN's ``outscale`` does. ``network_strength`` blends the
network's output with a plain Lanczos upscale, then an optional unsharp mask; on a GPU that finish
runs there too (``postprocess.finish``), on the CPU in Pillow.

Nothing is loaded at import time: :func:`get_upscaler` loads a model on first use and caches it
by (name, device, dtype, compile mode). With a compile mode (the chain passes the engine's
``ModelSettings.compile`` when ``compile_upscaler`` is on) the network is ``torch.compile``d and
each tile batch padded to a bucket, so a few static shapes serve every call.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from imagegenx.models.speed import batch_bucket, ready_thread_for_cuda_graphs
from imagegenx.postprocess.esrgan_weights import DEFAULT_MODEL, load_rrdbnet
from imagegenx.postprocess.rrdbnet import RRDBNet
from imagegenx.postprocess.steps import device_and_dtype, param

SUPPORTED_SCALES = (2, 4)

# --------------------------------------------------------------------------------------------------
# Upscaler


def _tiles(size: int, tile: int) -> list[tuple[int, int]]:
    """Split ``[0, size)`` into ceil(size / tile) nearly equal spans (equal spans batch together)."""
    count = max(1, math.ceil(size / tile))
    edges = [round(i * size / count) for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """CHW uint8: the tiles go to the device as bytes, a quarter of float32's, and become floats there."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


def lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, Image.Resampling.LANCZOS)


def fused_blocks_for(fused_blocks: bool | None) -> bool:
    """Whether the dense blocks run fused (postprocess/rrdbnet.py): as asked, or, for None, where
    measured faster, which is everywhere measured: the CPU (a 128² tile: 1.79-1.83 s against
    1.89-1.95, scripts/esrgan_blocks_cpu.py) and an H200 (compiled, 1024² in 512² tiles, batch 4:
    0.214 s an image against 0.281, BENCHMARKS.md)."""
    return True if fused_blocks is None else fused_blocks


class RealESRGAN:
    """A loaded Real-ESRGAN ×4 network on one device and dtype."""

    def __init__(
        self,
        model: RRDBNet,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        compile_mode: str = "off",
        fused_blocks: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.fused_blocks = fused_blocks_for(fused_blocks)
        if self.fused_blocks:
            model = model.fuse_dense_blocks()
        # channels_last lets cuDNN use tensor cores without layout transposes; on the CPU it buys nothing.
        self._memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.net = model.to(device=self.device, dtype=self.dtype, memory_format=self._memory_format)
        self.net.eval().requires_grad_(False)
        self.net_scale = model.scale
        # Compiled: LeakyReLU, the residual scaling and the dense blocks' concatenations fused around
        # the convolutions (the eager network runs at 12% of the matmul peak on an H200).
        self.compile_mode = compile_mode
        self.compiled = compile_mode != "off"
        if self.compiled:
            self.net.forward = torch.compile(self.net.forward, mode=compile_mode, dynamic=False)
        # One caller on the device at a time (a CUDA graph is not for two threads at once); what a
        # caller does with its pixels on the host after that overlaps the next caller's device work.
        self._device_lock = threading.Lock()

    @classmethod
    def from_package(
        cls,
        name: str = DEFAULT_MODEL,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compile_mode: str = "off",
        fused_blocks: bool | None = None,
    ) -> RealESRGAN:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(load_rrdbnet(name), device, dtype, compile_mode, fused_blocks)

    @torch.inference_mode()
    def _run(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """Network output of equally sized CHW uint8 tiles, as uint8 NHWC on the device (rounded there)."""
        rows = len(batch)
        if self.compiled:  # padded to the bucket (copies of the last tile), cut back below
            batch = batch + batch[-1:] * (batch_bucket(rows) - rows)
            ready_thread_for_cuda_graphs(self.compile_mode)  # a portrait's or a task's thread
        x = torch.stack(batch).to(self.device).float().div_(255.0)  # as float32 0-1 always was
        x = x.to(dtype=self.dtype, memory_format=self._memory_format)
        y = self.net(x)[:rows].float().clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
        return y.permute(0, 2, 3, 1)

    def network_upscale(
        self, images: Sequence[Image.Image], *, tile: int = 512, overlap: int = 32, batch_size: int = 4
    ) -> list[torch.Tensor]:
        """×4 network output per image as uint8 HWC tensors on the device.

        Each image is cut into tiles of at most ``tile`` pixels; a tile is read with ``overlap``
        pixels of context on each side (clipped at the image border) and that margin is cropped
        from its output. Tiles of the same input shape, across all images, run in batches.
        """
        if tile < 16 or overlap < 0:
            raise ValueError("tile must be ≥ 16 and overlap ≥ 0")
        s = self.net_scale
        tensors = [_to_tensor(image) for image in images]
        outputs = [
            torch.zeros((t.shape[1] * s, t.shape[2] * s, 3), dtype=torch.uint8, device=self.device)
            for t in tensors
        ]
        # (index, input box, crop inside the tile's output, placement in the image's output)
        jobs: dict[
            tuple[int, int], list[tuple[int, tuple[int, int, int, int], tuple[int, int, int, int]]]
        ] = {}
        for index, tensor in enumerate(tensors):
            height, width = tensor.shape[1:]
            for y0, y1 in _tiles(height, tile):
                for x0, x1 in _tiles(width, tile):
                    iy0, iy1 = max(0, y0 - overlap), min(height, y1 + overlap)
                    ix0, ix1 = max(0, x0 - overlap), min(width, x1 + overlap)
                    jobs.setdefault((iy1 - iy0, ix1 - ix0), []).append(
                        (index, (iy0, iy1, ix0, ix1), (y0 - iy0, y1 - iy0, x0 - ix0, x1 - ix0))
                    )
        for group in jobs.values():
            for start in range(0, len(group), max(1, batch_size)):
                chunk = group[start : start + max(1, batch_size)]
                result = self._run([tensors[i][:, a:b, c:d] for i, (a, b, c, d), _ in chunk])
                for out, (index, (iy0, _, ix0, _), (cy0, cy1, cx0, cx1)) in zip(result, chunk, strict=True):
                    oy, ox = (iy0 + cy0) * s, (ix0 + cx0) * s
                    outputs[index][oy : oy + (cy1 - cy0) * s, ox : ox + (cx1 - cx0) * s] = out[
                        cy0 * s : cy1 * s, cx0 * s : cx1 * s
                    ]
        return outputs

    def upscale(
        self,
        images: Sequence[Image.Image],
        scale: int = 4,
        *,
        tile: int = 512,
        overlap: int = 32,
        network_strength: float = 1.0,
        batch_size: int = 4,
        sharpen: bool = False,
    ) -> list[Image.Image]:
        """Upscale ×2 or ×4; ``network_strength`` in [0, 1] blends with a Lanczos upscale; ``sharpen``
        applies :func:`unsharp` (radius 2, 120%) at the end."""
        if scale not in SUPPORTED_SCALES:
            raise ValueError(f"scale must be one of {SUPPORTED_SCALES}, got {scale}")
        if not 0.0 <= network_strength <= 1.0:
            raise ValueError("network_strength must lie in [0, 1]")
        images = list(images)
        sizes = [(image.width * scale, image.height * scale) for image in images]
        alphas = [image.getchannel("A") if "A" in image.getbands() else None for image in images]
        rgb = [image.convert("RGB") for image in images]
        if network_strength == 0.0:
            results = [lanczos(image, size) for image, size in zip(rgb, sizes, strict=True)]
            results = [unsharp(image) for image in results] if sharpen else results
        elif self.device.type == "cuda":
            # The device's part under the lock, ending with the pixels on the host; Pillow's copies
            # of them (tens of ms a 4096² image) after it, while the next caller's tiles run.
            with self._device_lock:
                net = self.network_upscale(rgb, tile=tile, overlap=overlap, batch_size=batch_size)
                pixels = [
                    self._finish_on_device(image, out, size, network_strength, sharpen)
                    for image, size, out in zip(rgb, sizes, net, strict=True)
                ]
            results = [Image.fromarray(array) for array in pixels]
        else:
            with self._device_lock:
                net = self.network_upscale(rgb, tile=tile, overlap=overlap, batch_size=batch_size)
            results = [
                _finish_with_pillow(image, out, size, network_strength, sharpen)
                for image, size, out in zip(rgb, sizes, net, strict=True)
            ]
        for i, alpha in enumerate(alphas):
            if alpha is not None:
                results[i] = results[i].convert("RGBA")
                results[i].putalpha(lanczos(alpha, sizes[i]))
        return results

    def _finish_on_device(
        self, image: Image.Image, net: torch.Tensor, size: tuple[int, int], strength: float, sharpen: bool
    ) -> np.ndarray:
        """The finished HxWx3 uint8 pixels, brought to the host."""
        from imagegenx.postprocess.finish import finish

        original = torch.from_numpy(np.array(image)).to(self.device)
        return finish(net, original, size, strength, sharpen).cpu().numpy()


def _finish_with_pillow(
    image: Image.Image, net: torch.Tensor, size: tuple[int, int], strength: float, sharpen: bool
) -> Image.Image:
    """Resize the network's output to ``size``, blend it with a Lanczos upscale, sharpen (Pillow)."""
    result = Image.fromarray(net.cpu().numpy())
    if result.size != size:
        result = lanczos(result, size)
    if strength < 1.0:
        plain = np.asarray(lanczos(image, size), np.float32)
        result = _to_image(strength * np.asarray(result, np.float32) + (1 - strength) * plain)
    return unsharp(result) if sharpen else result


def unsharp(image: Image.Image, radius: float = 2.0, amount: float = 1.2, threshold: int = 0) -> Image.Image:
    """Unsharp mask: ``image + amount · (image − gaussian_blur(image, radius))``."""
    return image.filter(
        ImageFilter.UnsharpMask(radius=radius, percent=round(amount * 100), threshold=threshold)
    )


_CACHE: dict[tuple[str, str, torch.dtype, str, bool], RealESRGAN] = {}
_CACHE_LOCK = threading.Lock()


def get_upscaler(
    name: str = DEFAULT_MODEL,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    compile_mode: str = "off",
    fused_blocks: bool | None = None,
) -> RealESRGAN:
    """The cached :class:`RealESRGAN` for (name, device, dtype, compile mode, fused blocks), loaded
    on first use."""
    dev, dt = device_and_dtype(device, dtype)
    fused = fused_blocks_for(fused_blocks)  # None and its answer share one model
    key = (name, str(dev), dt, compile_mode, fused)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = RealESRGAN.from_package(name, dev, dt, compile_mode, fused)
        return _CACHE[key]


class Upscale:
    """Postprocess step: ``apply(images, params)`` with params ``scale`` (2 or 4, default 4),
    ``network_strength`` (default 1.0), ``unsharp`` (bool, default False), optional ``tile``,
    ``overlap`` and ``batch_size``. A mapping or an object with those attributes. ``compile_mode``:
    ``torch.compile`` the network; ``fused_blocks``: see :class:`RealESRGAN` (``upscaler_options``
    says the engine's choices)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compile_mode: str = "off",
        fused_blocks: bool | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.compile_mode = compile_mode
        self.fused_blocks = fused_blocks

    def apply(self, images: Sequence[Image.Image], params: Any = None) -> list[Image.Image]:
        images = list(images)
        if not images:
            return []
        upscaler = get_upscaler(self.model, self.device, self.dtype, self.compile_mode, self.fused_blocks)
        return upscaler.upscale(
            images,
            int(param(params, "scale", 4)),
            tile=int(param(params, "tile", 512)),
            overlap=int(param(params, "overlap", 32)),
            network_strength=float(param(params, "network_strength", 1.0)),
            batch_size=int(param(params, "batch_size", 4)),
            sharpen=bool(param(params, "unsharp", False)),
        )


def upscaler_options(denoiser: Any) -> dict[str, Any]:
    """``Upscale``'s options for a chain run by ``denoiser``: the compile mode (the engine's
    ``ModelSettings.compile`` when ``compile_upscaler`` is on) and ``upscaler_fused_blocks``; for a
    denoiser without settings, off and the device's default."""
    models = getattr(getattr(denoiser, "settings", None), "models", None)
    if models is None:
        return {"compile_mode": "off", "fused_blocks": None}
    return {"compile_mode": models.upscaler_compile, "fused_blocks": models.upscaler_fused_blocks}
