"""A tiny latent decoder (TAESD's kind, diffusers' ``AutoencoderTiny``) beside a model's full VAE.

The full SD/SDXL VAE decoder is most of a few-step image's work: 79% of the FLOPs of a 512² 1-step
image and 33% of a 1024² LCM-4 image, and it runs at 17-18% of the matmul peak (BENCHMARKS.md). A
tiny decoder does the same job with an 18th of the FLOPs (0.14 against 2.51 TFLOP at 512², 1.2M
parameters against 49M) and no GroupNorm, at a small cost in fine detail: what
real-time and draft traffic (StreamDiffusion's 106 fps, the portrait workload's 100 drafts before
QC) uses. Requests choose it per image (``decoder: "tiny"``); the full VAE stays the default.

Weights are the user's, like the model's (none can be installed here): ``ModelSettings.tiny_decoders``
maps a model family to a diffusers ``AutoencoderTiny`` folder (madebyollin's ``taesd`` for SD 1.5 and
2.x, ``taesdxl`` for SDXL, ``taesd3`` for SD 3.5, ``taef1`` for Flux), or to ``random`` (random
weights: noise images, for tests and speed measurements, as the ``random:*`` models). It is loaded
with the model and stays resident with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from imagegenx.config import ModelSettings
from imagegenx.models.speed import compile_decode
from imagegenx.types import UserError

__all__ = ["RANDOM", "TINY_DECODER_FAMILIES", "load_tiny_decoder"]

RANDOM = "random"
# Every family: the UNet ones' 4-channel latents (taesd, taesdxl), SD 3.5's and Flux's 16-channel ones
# (taesd3, taef1: the same architecture with 16 latent channels).
TINY_DECODER_FAMILIES = frozenset({"sd15", "sd21", "sdxl", "sdxl-refiner", "sd3", "flux"})
_TAESD_CHANNELS = 64  # the published TAESD decoders' width


def load_tiny_decoder(model: Any, family: str, settings: ModelSettings) -> Any | None:
    """The tiny decoder ``settings.tiny_decoders`` names for ``family``, on the model's device and in
    its dtype, compiled like the VAE; ``None`` when none is named. ``model`` is the loaded pipeline."""
    location = settings.tiny_decoder_for(family)
    if not location:
        return None
    if family not in TINY_DECODER_FAMILIES:
        families = ", ".join(sorted(TINY_DECODER_FAMILIES))
        raise UserError(f"tiny decoders are for the families {families}, not {family}")
    from diffusers import AutoencoderTiny

    vae = model.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    # 1. Weights: random, or the user's folder (safetensors only, never the network).
    if location == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same noise decoder in every process
            config = _random_config(factor, vae.config.latent_channels, max(vae.config.block_out_channels))
            decoder = AutoencoderTiny(**config)
    else:
        path = Path(location).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"tiny decoder for {family}: {path} is not a diffusers AutoencoderTiny folder")
        try:
            decoder = AutoencoderTiny.from_pretrained(path, use_safetensors=True, local_files_only=True)
        except (OSError, ValueError) as exc:  # no .safetensors weights, or ones that do not fit
            raise UserError(f"tiny decoder for {family}: cannot read {path}: {exc}".splitlines()[0]) from None
    # 2. It must decode these latents to the full VAE's size.
    ours = 2 ** (len(decoder.config.decoder_block_out_channels) - 1)
    if decoder.config.latent_channels != vae.config.latent_channels or ours != factor:
        raise UserError(
            f"tiny decoder for {family} takes {decoder.config.latent_channels}-channel latents at 1/{ours} "
            f"of the image, the model's VAE {vae.config.latent_channels} at 1/{factor}: "
            "use the tiny decoder made for this family (taesd for SD 1.5/2.x, taesdxl for SDXL, "
            "taesd3 for SD 3.5, taef1 for Flux)"
        )
    # 3. The model's device and dtype (TAESD does not overflow in fp16, unlike the SD VAEs).
    decoder.to(vae.device, vae.dtype).eval().requires_grad_(False)
    if settings.compile != "off" and settings.compile_vae:
        compile_decode(decoder, settings)
    return decoder


def _random_config(factor: int, latent_channels: int, vae_width: int = 128) -> dict[str, Any]:
    """TAESD's architecture (64 channels, blocks of 3) for a full-size VAE; for the tiny test
    models' VAEs (a few channels), one block per stage at their width, so that it stays smaller."""
    stages = factor.bit_length()  # 8 -> 4 stages: three upsamplings
    if factor == 8 and vae_width >= _TAESD_CHANNELS:
        encoder, decoder, width = (1, 3, 3, 3), (3, 3, 3, 1), _TAESD_CHANNELS
    else:
        encoder = decoder = (1,) * stages
        width = vae_width
    return {
        "latent_channels": latent_channels,
        "encoder_block_out_channels": (width,) * stages,
        "decoder_block_out_channels": (width,) * stages,
        "num_encoder_blocks": encoder,
        "num_decoder_blocks": decoder,
    }
