"""Count the distinct GEMM and convolution shapes of the SDXL UNet (batch 2, 1024²) and VAE decode.

Inductor's max-autotune benchmarks every candidate kernel for each distinct shape, so this count times
the seconds one selection takes (benchmarks/2026-11-30-autotune-h200.txt) says how long the fast
recipe's compile needs. Runs on the meta device: no memory, no weights, any machine.

    python scripts/count_gemm_shapes.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode

ARCH = Path(__file__).resolve().parents[1] / "src" / "imagegenx" / "models" / "archs" / "sdxl"
# Attention is one SDPA (flash) kernel on a GPU, not tuned; on meta it decomposes into bmm: left out.
TUNED = ("mm", "addmm", "convolution")


class ShapeCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, tuple]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in TUNED:
            self.seen.add((name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def main() -> None:
    dtype = torch.bfloat16
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ARCH / "unet")).to(dtype)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(ARCH / "vae")).to(dtype)
        added = {"text_embeds": torch.empty(2, 1280, dtype=dtype), "time_ids": torch.empty(2, 6, dtype=dtype)}
        with ShapeCounter() as unet_shapes:
            latents = torch.empty(2, 4, 128, 128, dtype=dtype)
            text = torch.empty(2, 77, 2048, dtype=dtype)
            unet(latents, torch.full((2,), 500.0), encoder_hidden_states=text, added_cond_kwargs=added)
        with ShapeCounter() as vae_shapes:
            vae.decode(torch.empty(1, 4, 128, 128, dtype=dtype))
    by_op = {op: sum(1 for name, _ in unet_shapes.seen if name == op) for op in TUNED}
    print(
        json.dumps(
            {
                "unet_batch2_1024": len(unet_shapes.seen),
                "unet_by_op": by_op,
                "vae_decode_1024": len(vae_shapes.seen),
            }
        )
    )


if __name__ == "__main__":
    main()
