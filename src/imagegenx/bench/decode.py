"""The ``vae-decode-1024`` scenario: the SDXL VAE's decode of 1024² latents alone, and the tiny
decoder's, as the engine runs them.

Eager (``compile`` off): fp32 and bf16 (the SDXL VAE overflows in fp16; the engine decodes in bf16
where the GPU has it), batches of 1 and 4. Compiled (the settings' ``compile`` mode, as the engine
compiles it, batches padded): bf16 batch 4 only, since each dtype and batch is a compile of its own,
in NCHW and in channels_last (eager, channels_last was 25% slower: the GroupNorms copy NHWC
activations back and forth; compiled, Inductor fuses them with the SiLUs between the convolutions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from imagegenx.bench.measure import Row, count_tflop, free_device, peak_gib, reset_peak, timed
from imagegenx.models.cache import ModelCache
from imagegenx.models.tiny_decoder import TINY_DECODER_FAMILIES

if TYPE_CHECKING:  # the registry in scenarios.py imports this module
    from imagegenx.bench.scenarios import BenchContext


def vae_decode(name: str, ctx: BenchContext) -> list[Row]:
    ref, side = ("random:tiny-sdxl", 8) if ctx.smoke else ("random:sdxl", 128)
    device = ctx.device
    models = ctx.settings.models
    random = {family: "random" for family in TINY_DECODER_FAMILIES}
    model = ModelCache(models.model_copy(update={"tiny_decoders": random | models.tiny_decoders})).get(ref)
    vae, tiny = model.pipe.vae, model.tiny_decoder
    compiled = model.speedups.get("compile_vae", False)
    mode = f", compiled ({models.compile})" if compiled else ""

    def measure(decoder, dtype: torch.dtype, batch: int, label: str, channels_last: bool = False) -> Row:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        latents = torch.randn(batch, decoder.config.latent_channels, side, side, device=device, dtype=dtype)
        latents = latents.to(memory_format=layout)
        tflop = count_tflop(lambda: decoder.decode(latents[:1]))
        with torch.inference_mode():
            decoder.decode(latents)  # a compiled decode compiles here
            reset_peak(device)
            best = min(timed(device, lambda: decoder.decode(latents))[0] for _ in range(3))
        return Row(
            name, f"{label} batch {batch}{mode}", batch, best, [], peak_gib(device), tflop, "best of 3"
        )

    def dtype_name(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    if compiled:
        vae.to(torch.bfloat16)
        rows = [measure(vae, torch.bfloat16, 4, "imagegenx vae bfloat16")]
        vae.to(memory_format=torch.channels_last)
        rows.append(
            measure(vae, torch.bfloat16, 4, "imagegenx vae bfloat16 channels_last", channels_last=True)
        )
    else:
        rows = [
            measure(vae.to(dtype), dtype, batch, f"imagegenx vae {dtype_name(dtype)}")
            for dtype in (torch.float32, torch.bfloat16)
            for batch in (1, 4)
        ]
    # The tiny decoder (TAESDXL's architecture) in the dtype the engine gives it, the model's.
    label = f"imagegenx tiny decoder {dtype_name(tiny.dtype)}"
    rows += [measure(tiny, tiny.dtype, batch, label) for batch in (1, 4)]
    del vae, tiny, model
    free_device()
    return rows
