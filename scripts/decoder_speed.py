"""The full VAE decode against the tiny decoder (TAESD's architecture), full size, random weights, on
any device: seconds per image (best of --repeats) and TFLOP per image, as JSON on stdout.

    python scripts/decoder_speed.py --arch sd21 --size 512 [--device cpu] [--batch 1] [--dtype float32]

The engine's own numbers come from `imagegenx bench vae-decode-1024` (SDXL, 1024²) on a GPU; this
one also runs where a full bench cannot (the CPU) and for the SD 2.x VAE of turbo-512-1.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from imagegenx.config import ModelSettings
from imagegenx.models.loader import load_model
from imagegenx.models.sources import resolve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd21", choices=("sd15", "sd21", "sdxl"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    settings = ModelSettings(device=a.device, dtype=a.dtype, tiny_decoders={a.arch: "random"})
    model = load_model(resolve(f"random:{a.arch}", settings), settings)
    side = a.size // model.vae_scale_factor
    results = {}
    for name, decoder in (("full", model.pipe.vae), ("tiny", model.tiny_decoder)):
        latents = torch.randn(a.batch, 4, side, side, device=decoder.device, dtype=decoder.dtype)
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                decoder.decode(latents[:1])
            seconds = []
            for _ in range(a.repeats + 1):  # the first is a warm-up
                started = time.perf_counter()
                decoder.decode(latents)
                if decoder.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - started)
        results[name] = {
            "s_per_image": round(min(seconds[1:]) / a.batch, 4),
            "tflop_per_image": round(counter.get_total_flops() / 1e12, 3),
        }
    results["speedup"] = round(results["full"]["s_per_image"] / results["tiny"]["s_per_image"], 1)
    print(json.dumps({"arch": a.arch, "size": a.size, "device": a.device, "dtype": a.dtype, **results}))


if __name__ == "__main__":
    main()
