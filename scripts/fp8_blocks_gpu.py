"""Flux's two transformer blocks at 1024² (4096 image + 512 text tokens), bf16 against fp8, compiled.

What fp8 would bring to flux-dev-1024-28 without compiling the whole 12B transformer: one
double-stream and one single-stream block of Flux.1-dev's real width (3072, 24 heads), random
weights, ``torch.compile`` default mode like our regional compile, in bf16 and after
``quantize_fp8`` with per-row and per-tensor scales (the engine's float8 layers). A step is 19
double + 38 single blocks, so the report also scales the block times to 28 steps (the blocks are
~95% of Flux's FLOPs). Two more figures say where a gain went:
- each block's host time per call (queuing its kernels, with no wait for the device): a block
  whose host time nears its device time is paced by Python, not by its matmuls;
- the matmul ceiling: the blocks' three GEMM shapes alone in bf16 and as float8 ``torch._scaled_mm``
  with per-tensor and per-row scales (what fp8 can give at best, before the activation's scaling).

    python scripts/fp8_blocks_gpu.py OUT.json            # on the GPU
    python scripts/fp8_blocks_gpu.py OUT.json --tiny     # a CPU check of the script (no fp8)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from imagegenx.bench.measure import sync, timed
from imagegenx.models.speed import quantize_fp8


def median_seconds(fn: Callable[[], object], device: torch.device, runs: int) -> float:
    """Median seconds of ``fn()`` over ``runs`` calls, after two untimed ones (the compile)."""
    for _ in range(2):
        fn()
    return statistics.median(timed(device, fn)[0] for _ in range(runs))


def host_seconds(fn: Callable[[], object], device: torch.device, runs: int) -> float:
    """Seconds per call the host spends queuing ``fn()``'s work, the device not waited for."""
    sync(device)
    started = time.perf_counter()
    for _ in range(runs):
        fn()
    queued = time.perf_counter() - started
    sync(device)
    return queued / runs


def matmul_ceiling(tokens: int, dim: int, device: torch.device, runs: int) -> dict[str, float]:
    """TFLOP/s of the blocks' GEMM shapes (attention projections, MLP up, the single block's out) in
    bf16 and float8 with per-tensor and per-row scales, fast accumulation as torchao's layers use."""
    report = {}
    for k, n in ((dim, dim), (dim, 4 * dim), (5 * dim, dim)):
        a = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        scales = {
            "tensor": (torch.ones((), device=device), torch.ones((), device=device)),
            "row": (torch.ones(tokens, 1, device=device), torch.ones(1, n, device=device)),
        }
        calls = {"bf16": lambda a=a, b=b: a @ b.t()}
        for name, (sa, sb) in scales.items():
            calls[f"fp8_{name}"] = lambda a8=a8, b8=b8, sa=sa, sb=sb: torch._scaled_mm(
                a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True
            )
        for name, call in calls.items():
            seconds = median_seconds(call, device, runs)
            report[f"{tokens}x{k}x{n}_{name}_tflops"] = round(2 * tokens * k * n / seconds / 1e12, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="small widths on the CPU, no fp8")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dim, heads, image, text = (64, 2, 64, 16) if args.tiny else (3072, 24, 4096, 512)
    torch.manual_seed(0)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    hidden = torch.randn(1, image, dim, device=device, dtype=dtype)
    context = torch.randn(1, text, dim, device=device, dtype=dtype)
    temb = torch.randn(1, dim, device=device, dtype=dtype)
    head = dim // heads
    rope = (torch.ones(image + text, head, device=device), torch.zeros(image + text, head, device=device))
    blocks = {
        "double": FluxTransformerBlock(dim, heads, head),
        "single": FluxSingleTransformerBlock(dim, heads, head),
    }
    report: dict = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }

    def save() -> None:  # after each figure: what was measured survives a cut
        args.out.write_text(json.dumps(report, indent=2))

    for name, block in blocks.items():
        plain = block.to(device, dtype).eval()
        variants = {"bf16": plain}
        if not args.tiny:
            for granularity in ("row", "tensor"):
                quantized = variants[f"fp8_{granularity}"] = copy.deepcopy(plain)
                report[f"{name}_fp8_layers"] = quantize_fp8(quantized, granularity=granularity)
        for variant, module in variants.items():
            compiled = torch.compile(module, mode="default", dynamic=False)

            def call(m=compiled) -> object:
                return m(hidden, context, temb, image_rotary_emb=rope)

            with torch.inference_mode():
                seconds = median_seconds(call, device, args.runs)
                host = host_seconds(call, device, args.runs)
            report[f"{name}_{variant}_ms"] = round(seconds * 1000, 3)
            report[f"{name}_{variant}_host_ms"] = round(host * 1000, 3)
            save()
            print(name, variant, f"{seconds * 1000:.3f} ms, host {host * 1000:.3f} ms", flush=True)
    for variant in ("bf16", "fp8_row", "fp8_tensor"):
        if f"single_{variant}_ms" in report:
            step = 19 * report[f"double_{variant}_ms"] + 38 * report[f"single_{variant}_ms"]
            report[f"blocks_28_steps_{variant}_s"] = round(28 * step / 1000, 3)
    save()
    if not args.tiny:
        report |= matmul_ceiling(image + text, dim, device, args.runs)
        save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
