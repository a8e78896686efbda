"""Speed-ups applied to a loaded model's components, each a setting so it can be measured on and off.

- ``channels_last``: NHWC memory format for the UNet's convolutions; cuDNN then uses tensor cores
  without layout transposes (on by default on CUDA, where it helps; off on the CPU). Not for the VAE:
  its GroupNorms copy NHWC activations back and forth, and an SDXL 1024² decode was 25% slower in
  channels_last on an H200 (benchmarks/2026-11-29b-vae-layout-h200.json). Compiled, Inductor fuses
  those copies away, and diffusers' recipe compiles its VAE channels_last: ``vae_channels_last``
  measures that (off by default until it is measured faster).
- ``fuse_qkv``: one projection for attention's q, k and v (diffusers' ``fuse_qkv_projections``);
  LoRAs only merged into the weights (``lora_fused``, which refreshes the fused projections).
  Off by default: LoRAs target ``to_q``/``to_k``/``to_v`` and a fused model cannot take them.
- ``compile``: ``torch.compile`` of the UNet (or only its repeated blocks: ``compile_regional``)
  and, as they load, its ControlNets (``default``,
  ``reduce-overhead`` for CUDA graphs, or ``max-autotune``). Static shapes: the engine pads each
  UNet batch to a bucket (1, 2, 4, 8, ... rows) so a handful of graphs serve every batch size;
  ``compile_dynamic`` trades them for Dynamo's automatic dynamic shapes: one graph general in the
  batch (and resolution) from the second size on, so two compiles instead of one per bucket;
  compiled kernels persist in Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default
  ``ModelSettings.compile_cache_dir`` under the data folder), so a restart does not compile again
  from scratch.
- ``compile_vae``: with ``compile`` on, the VAE decode is compiled too, its batch padded to the same
  buckets (it is 40% of an SDXL 1024² LCM-4 image on an H200, and runs at 15% of the matmul peak
  eager: GroupNorm and SiLU between the convolutions are memory-bound, which fusion helps).
- ``attention``: the one SDPA kernel allowed on CUDA (cuDNN's, FlashAttention-2, memory-efficient),
  or PyTorch's own pick (``auto``), to measure them against each other.
- ``cudnn_benchmark``: cuDNN tries its convolution algorithms on the first call of each input shape
  and keeps the fastest, instead of picking one by heuristics (a process-wide flag; CUDA only). The
  engine's shapes are few (padded batch buckets, fixed upscaler tiles), so the trials are paid once.
- ``fp8``: the denoiser's linear layers in float8 (torchao's dynamic float8 activations and float8
  weights, one scale per row), applied before ``torch.compile``, which fuses each activation's
  quantization into the kernel before it. Needs float8 matmuls (a CUDA GPU of compute capability
  8.9+: Ada, Hopper, Blackwell; torchao refuses other devices) and bfloat16 weights (torchao's
  per-row scales take nothing else). Off by default, and it excludes LoRAs: PEFT's
  LoRA layer over torchao weights is made for int8 ones and the adapters' hot-swap is untested over
  float8, so a job with a LoRA on such a model is refused (``lora_refusal``), never run without it.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from imagegenx.config import ModelSettings
from imagegenx.models.compile_artifacts import load_compile_artifacts
from imagegenx.types import UserError

# Linear layers fed one row per image (timestep, pooled-text and guidance embeddings, the resnets'
# time projections, the AdaLN scale/shift of transformer blocks) stay in bf16: with a handful of
# rows the matmul is tiny, so fp8 saves nothing there and quantizing the activation only costs time,
# while their error would shift every block they condition.
_PER_IMAGE_PARTS = frozenset(
    {"time_embedding", "add_embedding", "class_embedding", "time_text_embed", "time_emb_proj"}
)
_FP8_FEATURE_MULTIPLE = 16  # float8 matmuls (torch._scaled_mm) need both dimensions a multiple of 16


REGIONAL_BUCKET_STEP = 8  # rows: a regionally compiled UNet's buckets above 8 rows (see batch_bucket)


def batch_bucket(rows: int, step: int = 0) -> int:
    """The padded UNet batch for ``rows`` rows when the UNet is compiled: the next power of two, or
    with ``step``, above ``step`` rows the next multiple of it. A whole-UNet compile takes minutes
    a shape, so its shapes are few and padding pays for that (20 rows run as 32); a regionally
    compiled one compiles a new shape in seconds, so its buckets are finer (20 rows run as 24)."""
    power = 1 << max(0, rows - 1).bit_length()
    if step and rows > step:
        return min(power, -(-rows // step) * step)
    return power


def decode_chunks(rows: int) -> list[int]:
    """How a compiled decoder splits a batch of ``rows`` latents: one padded bucket where padding
    wastes at most a quarter of the rows (7 run as 8), else the largest power of two that fits and
    the rest the same way (10 run as 8 + 2, not as 16). Every chunk is a power of two, so the shapes
    are the warm-up's; the decode of a latent is independent of its batch, so nothing changes."""
    chunks = []
    while rows:
        bucket = batch_bucket(rows)
        if 4 * (bucket - rows) <= rows:
            chunks.append(rows)
            break
        chunks.append(bucket // 2)
        rows -= bucket // 2
    return chunks


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
    vae = getattr(pipe, "vae", None)
    if settings.vae_channels_last and vae is not None:
        vae.to(memory_format=torch.channels_last)
        applied["vae_channels_last"] = True
    if use_cudnn_benchmark(settings, device):
        applied["cudnn_benchmark"] = True
    if kernel := use_attention_kernel(settings, device):
        applied["attention"] = kernel
    if settings.fuse_qkv and denoiser is not None and hasattr(denoiser, "fuse_qkv_projections"):
        denoiser.fuse_qkv_projections()
        applied["fuse_qkv"] = True
    if settings.fp8 and denoiser is not None:
        # Before compile: Dynamo then traces the float8 layers and fuses their activation scaling.
        check_fp8_supported(denoiser, device)
        applied["fp8"] = quantize_fp8(
            denoiser, tune=settings.compile == "max-autotune", granularity=settings.fp8_granularity
        )
    if settings.compile != "off" and denoiser is not None:
        if settings.inductor_flags:
            applied["inductor_flags"] = set_inductor_flags(settings.inductor_flags)
        # Inductor reads its cache folder when it compiles (the first call), not at import.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.compile_cache_dir))
        # Each bucket and resolution is its own graph: allow more of them than Dynamo's default 8.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if loaded := load_compile_artifacts(settings.compile_artifacts):  # before the first compile
            applied["compile_artifacts"] = loaded
        regional = settings.compile_regional
        if regional is None:  # by default, by blocks for a transformer, whole for a UNet
            regional = getattr(pipe, "unet", None) is None
        blocks = list(getattr(denoiser, "_repeated_blocks", None) or []) if regional else []
        if compile_module(denoiser, settings.compile, blocks, settings.compile_dynamic):
            applied["compile_regional"] = blocks
        applied["compile"] = settings.compile
        if settings.compile_dynamic:
            applied["compile_dynamic"] = True
        if settings.compile_vae and vae is not None:
            compile_decode(vae, settings)
            applied["compile_vae"] = True
    return applied


def compile_module(module: torch.nn.Module, mode: str, blocks: list[str], dynamic: bool = False) -> bool:
    """Compile ``module``'s submodules whose class is named in ``blocks`` (regional compilation: the
    copies of a block share one graph, as diffusers' ``compile_repeated_blocks`` does); where there
    are none, the whole ``module``. Static shapes, or with ``dynamic`` Dynamo's automatic dynamic
    ones (``ModelSettings.compile_dynamic``). Returns whether it compiled by blocks."""
    shapes = _dynamic_argument(dynamic)
    regions = [sub for sub in module.modules() if type(sub).__name__ in blocks]
    for sub in regions:
        sub.compile(mode=mode, dynamic=shapes)
    if not regions:
        module.forward = torch.compile(module.forward, mode=mode, dynamic=shapes)
    return bool(regions)


def ready_thread_for_cuda_graphs(compile_mode: str) -> None:
    """Give the calling thread the per-thread state of Inductor's CUDA graph trees, under
    ``reduce-overhead``. torch 2.11 (the GPU image's) sets it up only on the thread that imported
    ``cudagraph_trees`` and on autograd's threads, so a compiled model that a second engine thread
    of one process called (the bench's next scenario) failed with a bare ``AssertionError``; later
    torch sets it up on any thread, and then this does nothing. Cheap once done: call it before
    every call of a CUDA-graphed model from a thread that may be new (the upscaler's callers)."""
    if compile_mode != "reduce-overhead":
        return
    from torch._inductor import cudagraph_trees  # heavy: only when CUDA graphs are on

    local = cudagraph_trees.local
    for name, fresh in (("tree_manager_containers", dict), ("tree_manager_locks", _lock_table)):
        if not hasattr(local, name) and not torch._C._is_key_in_tls(name):
            setattr(local, name, fresh())
            torch._C._stash_obj_in_tls(name, getattr(local, name))


def _lock_table() -> defaultdict[int, threading.Lock]:
    return defaultdict(threading.Lock)


def _dynamic_argument(dynamic: bool) -> bool | None:
    """torch.compile's ``dynamic``: False forces static shapes; None lets a size that changes make
    the graph's next compile general in it."""
    return None if dynamic else False


# ModelSettings.attention -> the torch.backends.cuda switch of that SDPA kernel.
SDPA_KERNELS = {
    "cudnn": "enable_cudnn_sdp",
    "flash": "enable_flash_sdp",
    "efficient": "enable_mem_efficient_sdp",
}


def use_attention_kernel(settings: ModelSettings, device: torch.device) -> str | None:
    """Allow scaled_dot_product_attention only the kernel the settings name (and the math one, its
    fallback) where the device is CUDA; returns that kernel, or None where PyTorch picks."""
    if settings.attention == "auto" or device.type != "cuda":
        return None
    for kernel, switch in SDPA_KERNELS.items():
        getattr(torch.backends.cuda, switch)(kernel == settings.attention)
    return settings.attention


def set_inductor_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Set Inductor's config flags (``ModelSettings.inductor_flags``), process-wide like cuDNN's;
    returns them. A name Inductor does not have is a ``UserError``, before anything is set."""
    import torch._inductor.config as inductor

    unknown = sorted(name for name in flags if not hasattr(inductor, name))
    if unknown:
        raise UserError(f"unknown Inductor flag(s) in IMAGEGENX_MODELS__INDUCTOR_FLAGS: {', '.join(unknown)}")
    for name, value in flags.items():
        setattr(inductor, name, value)
    return dict(flags)


def use_cudnn_benchmark(settings: ModelSettings, device: torch.device) -> bool:
    """Turn cuDNN's per-shape algorithm trials on where the settings ask for them and the device is
    CUDA; returns whether they are on."""
    if settings.cudnn_benchmark and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return True
    return False


def lora_refusal(applied: dict[str, Any], merged: bool = False) -> str:
    """Why a model with these speed-ups takes no LoRA ("" when it does); ``merged``: LoRAs would be
    merged into its weights (``FusedLoraSet``), which also refreshes fused QKV projections."""
    if "fp8" in applied:
        return (
            "LoRAs are not supported on an fp8 model (IMAGEGENX_MODELS__FP8): use a model loaded without fp8"
        )
    if "fuse_qkv" in applied and not merged:
        # The fused attention reads to_qkv only: a LoRA adapter on to_q/to_k/to_v would be ignored.
        return (
            "LoRAs as adapters are not supported with fused QKV projections (IMAGEGENX_MODELS__FUSE_QKV): "
            "set IMAGEGENX_MODELS__LORA_MODE=fused"
        )
    return ""


def is_fp8_linear(module: torch.nn.Module, name: str) -> bool:
    """Whether ``quantize_fp8`` turns this layer (``name`` in the denoiser) into float8."""
    if not isinstance(module, torch.nn.Linear):
        return False
    if module.in_features % _FP8_FEATURE_MULTIPLE or module.out_features % _FP8_FEATURE_MULTIPLE:
        return False
    parts = name.split(".")
    # A linear inside a norm module is an AdaLN modulation (norm1.linear, norm_out.linear, ...).
    return not (_PER_IMAGE_PARTS.intersection(parts) or any(p.startswith("norm") for p in parts[:-1]))


def check_fp8_supported(denoiser: torch.nn.Module, device: torch.device) -> None:
    """Raise ``UserError`` saying what fp8 needs when this device or dtype cannot run it."""
    if not _has_float8_matmuls(device):
        what = device.type if device.type != "cuda" else torch.cuda.get_device_name(device)
        raise UserError(
            f"fp8 needs float8 matmuls: a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, "
            f"Blackwell), not {what}; unset IMAGEGENX_MODELS__FP8 on this machine"
        )
    dtype = str(next(denoiser.parameters()).dtype).removeprefix("torch.")
    if dtype != "bfloat16":
        raise UserError(
            f"fp8 needs bfloat16 weights (torchao's per-row float8 scales), not {dtype}: "
            "set IMAGEGENX_MODELS__DTYPE=bfloat16"
        )


def _has_float8_matmuls(device: torch.device) -> bool:
    # torch._scaled_mm also runs on the CPU, but torchao refuses float8 there: only what it supports.
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_fp8(denoiser: torch.nn.Module, tune: bool = False, granularity: str = "row") -> int:
    """Float8 dynamic activations and float8 weights, scaled per row (or per tensor: ``granularity``),
    on the layers ``is_fp8_linear`` picks; returns how many were quantized.

    torchao by default also switches Inductor's coordinate-descent tuning on, every direction: a
    cubin built and timed per candidate of every kernel, more than 300 s for Flux's transformer on an
    H200 (two device calls cut short, BENCHMARKS.md ninth session). That tuning belongs to
    ``compile="max-autotune"`` (``tune``), not to every fp8 model."""
    try:  # an optional extra, imported only when fp8 is asked for
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            PerTensor,
            quantize_,
        )
    except ImportError:
        raise UserError("fp8 needs torchao: pip install 'imagegenx[fp8]'") from None

    picked = [name for name, module in denoiser.named_modules() if is_fp8_linear(module, name)]
    quantize_(
        denoiser,
        Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow() if granularity == "row" else PerTensor(), set_inductor_config=tune
        ),
        filter_fn=is_fp8_linear,
    )
    return len(picked)


def parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of ``module``'s weights, read from its first parameter. diffusers' ``.dtype`` walks
    every submodule for casting hooks on each call (the SDXL VAE: 358 µs against 2.7 µs here; asked
    once per decode, 5% of a CPU worker's interpreter time at small batches). For modules whose
    weights share one dtype (the VAEs, the tiny decoders)."""
    return next(module.parameters()).dtype


def decode_dtype(vae: Any, device: torch.device) -> torch.dtype:
    """The dtype ``vae`` decodes in. The SD VAEs overflow in fp16 (diffusers' ``force_upcast``):
    bf16 has fp32's range, so on GPUs that have it they run in bf16 (1.4x faster than fp32 at 1024²,
    benchmarks/), else in fp32. Other VAEs keep their dtype."""
    if vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        return vae.dtype
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def compile_decode(decoder: Any, settings: ModelSettings) -> None:
    """Compile ``decoder.decode`` (a VAE or a tiny decoder) in the settings' mode, its batch split
    and padded to power-of-two buckets so a few static shapes serve every batch."""
    dynamic = _dynamic_argument(settings.compile_dynamic)
    compiled = torch.compile(decoder.decode, mode=settings.compile, dynamic=dynamic)
    decoder.decode = padded_decode(compiled)


def padded_decode(decode: Callable[..., Any]) -> Callable[..., Any]:
    """``vae.decode`` in chunks of static shapes (``decode_chunks``), each padded to its bucket with
    copies of its last latent, so a compiled decode sees a few shapes; the padding rows are cut off."""

    def decode_padded(z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        # One memory layout too: latents come channels_last from the UNet and contiguous from other
        # paths, and each layout was a compile of its own (Dynamo guards on strides).
        z = z.contiguous()
        chunks = decode_chunks(z.shape[0])
        parts, start = [], 0
        for rows in chunks:
            part = z[start : start + rows]
            start += rows
            if extra := batch_bucket(rows) - rows:
                part = torch.cat([part, part[-1:].expand(extra, *part.shape[1:])])
            pixels = decode(part, return_dict=False, **kwargs)[0][:rows]
            # Under CUDA graphs an output lives in the graph's memory, which the next chunk's graph
            # may write over: a copy keeps it.
            parts.append(pixels.clone() if len(chunks) > 1 else pixels)
        pixels = parts[0] if len(parts) == 1 else torch.cat(parts)
        if not return_dict:
            return (pixels,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=pixels)

    return decode_padded
