"""Flux's two transformer blocks at 1024² (4096 image + 512 text tokens), bf16 against fp8, compiled.

What fp8 would bring to flux-dev-1024-28 without compiling the whole 12B transformer (a compile that
never fit a device call): one double-stream and one single-stream block of Flux.1-dev's real width
(3072, 24 heads), random weights, ``torch.compile`` default mode like our regional compile, each in
bf16 and after ``quantize_fp8`` (the engine's float8 layers). A step is 19 double + 38 single blocks,
so the report also scales the block times to 28 steps (the blocks are ~95% of Flux's FLOPs).

    python scripts/fp8_blocks_gpu.py OUT.json            # on the GPU
    python scripts/fp8_blocks_gpu.py OUT.json --tiny     # a CPU check of the script (no fp8)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from imagegenx.bench.measure import timed
from imagegenx.models.speed import quantize_fp8


def median_seconds(fn, device: torch.device, runs: int) -> float:
    """Median seconds of ``fn()`` over ``runs`` calls, after two untimed ones (the compile)."""
    for _ in range(2):
        fn()
    return statistics.median(timed(device, fn)[0] for _ in range(runs))


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
    calls = {
        "double": lambda b: b(hidden, context, temb, image_rotary_emb=rope),
        "single": lambda b: b(hidden, context, temb, image_rotary_emb=rope),
    }
    report: dict = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    for name, block in blocks.items():
        plain = block.to(device, dtype).eval()
        variants = {"bf16": plain}
        if not args.tiny:
            variants["fp8"] = copy.deepcopy(plain)
            report[f"{name}_fp8_layers"] = quantize_fp8(variants["fp8"])
        for variant, module in variants.items():
            compiled = torch.compile(module, mode="default", dynamic=False)
            with torch.inference_mode():
                seconds = median_seconds(lambda m=compiled, n=name: calls[n](m), device, args.runs)
            report[f"{name}_{variant}_ms"] = round(seconds * 1000, 3)
            args.out.write_text(json.dumps(report, indent=2))  # what was measured survives a cut
            print(name, variant, f"{seconds * 1000:.3f} ms", flush=True)
    for variant in ("bf16", "fp8"):
        if f"single_{variant}_ms" in report:
            step = 19 * report[f"double_{variant}_ms"] + 38 * report[f"single_{variant}_ms"]
            report[f"blocks_28_steps_{variant}_s"] = round(28 * step / 1000, 3)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
