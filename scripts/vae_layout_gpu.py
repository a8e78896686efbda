"""SDXL VAE decode at 1024² on a GPU: NCHW against channels_last, and the copy of the pixels to the host.

Run on a CUDA machine:  python scripts/vae_layout_gpu.py OUT.json
The engine profile (benchmarks/2026-11-29b-profile-h200-sdxl-1024-lcm4.txt) spent 30% of the GPU's
time in one generic elementwise kernel and 6% in device-to-host copies of float32 pixels; this
measures both suspects on and off.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from diffusers import AutoencoderKL
from torch.profiler import ProfilerActivity, profile

from imagegenx.models.sources import arch_dir


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def main(out: str) -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(arch_dir("sdxl") / "vae"))
    vae = vae.to(torch.bfloat16).eval()
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for batch in (4, 16):
        latents = torch.randn(batch, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            vae.to(memory_format=fmt)
            with torch.inference_mode():
                seconds = best_of(lambda latents=latents: vae.decode(latents).sample)
            report[f"decode batch {batch} {layout} s/image"] = round(seconds / batch, 4)
            print(f"decode batch {batch} {layout}: {seconds / batch:.4f} s/image", flush=True)
    # The pixels to the host: float32 (as the engine copies them) against uint8 made on the device.
    pixels = torch.rand(16, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16) * 2 - 1
    as_float = best_of(lambda: (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy())
    scaled = lambda: ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    as_uint8 = best_of(lambda: scaled().permute(0, 2, 3, 1).cpu().numpy())
    report["host copy of 16 images float32 s"] = round(as_float, 4)
    report["host copy of 16 images uint8 s"] = round(as_uint8, 4)
    print(f"host copy of 16 1024² images: float32 {as_float:.4f} s, uint8 {as_uint8:.4f} s", flush=True)
    # Which kernels a channels_last decode of 4 runs, with full names.
    vae.to(memory_format=torch.channels_last)
    latents = torch.randn(4, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        vae.decode(latents)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:8]
    report["channels_last top kernels"] = [
        {"name": e.key[:300], "ms": round(e.self_device_time_total / 1000, 2), "calls": e.count} for e in rows
    ]
    for row in report["channels_last top kernels"]:
        print(row, flush=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vae-layout.json")
