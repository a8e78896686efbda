"""ControlNet models: loaded on first use beside their base model, then kept resident with it.

A reference is one of:

- a folder in the model folder (or a path) holding a diffusers ControlNet (``config.json`` and
  ``diffusion_pytorch_model.safetensors``; only safetensors are read), e.g. an OpenPose, Canny or
  Depth ControlNet for SD 1.5 or SDXL, or InstantID's IdentityNet;
- ``random:controlnet``: random weights in the base model's own architecture (ControlNet's
  ``from_unet``, its zero convolutions drawn at random too so the control visibly acts). For tests
  and speed measurements, like the ``random:`` base models.

The engine keeps loaded ControlNets in the base model's ``extras``: evicting the base drops them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from imagegenx.config import ModelSettings
from imagegenx.models.loader import LoadedModel
from imagegenx.models.speed import compile_module, quantize_fp8
from imagegenx.types import UserError

RANDOM_CONTROLNET = "random:controlnet"


def load_controlnet(ref: str, base: LoadedModel, settings: ModelSettings) -> Any:
    """The ControlNet ``ref`` on ``base``'s device and dtype (see the module docstring)."""
    if not base.uses_engine_loop:
        raise UserError(f"ControlNet needs an SD 1.5, SD 2.x or SDXL base model, not {base.family}")
    if ref == RANDOM_CONTROLNET:
        net = _random_controlnet(base)
    else:
        net = _from_folder(_folder(ref, settings), base.dtype)
    net = net.to(base.device, base.dtype).eval().requires_grad_(False)
    if net.config.cross_attention_dim != base.pipe.unet.config.cross_attention_dim:
        raise UserError(f"ControlNet {ref!r} was made for another model family than {base.source.name!r}")
    if base.speedups.get("fp8"):
        # Float8 as the UNet it feeds: an IdentityNet is about a third of an InstantID draft's step.
        # Before compile, as for the UNet, so the activations' scaling fuses.
        quantize_fp8(net, tune=settings.compile == "max-autotune", granularity=settings.fp8_granularity)
    if "compile" in base.speedups:
        # Compiled as the UNet it feeds: every row of the padded batch bucket runs through it
        # (pipelines/control.py), so the same few static shapes reach it.
        speedups = base.speedups
        regional, dynamic = speedups.get("compile_regional", []), speedups.get("compile_dynamic", False)
        compile_module(net, speedups["compile"], regional, dynamic)
    return net


def _folder(ref: str, settings: ModelSettings) -> Path:
    for folder in (settings.model_dir / ref, Path(ref).expanduser()):
        if (folder / "config.json").is_file():
            return folder
    raise UserError(
        f"no ControlNet {ref!r}: expected a diffusers ControlNet folder (config.json and "
        f"diffusion_pytorch_model.safetensors) in {settings.model_dir}, or {RANDOM_CONTROLNET}"
    )


def _from_folder(folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import ControlNetModel

    try:
        return ControlNetModel.from_pretrained(
            folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: not a ControlNet with .safetensors weights ({exc})") from None


def _random_controlnet(base: LoadedModel) -> Any:
    from diffusers import ControlNetModel

    unet = base.pipe.unet
    # The conditioning embedding must shrink the control image to the latent size.
    levels = int(math.log2(base.vae_scale_factor))
    channels = tuple(16 * 2**i for i in range(levels + 1))
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    if unet.encoder_hid_proj is not None:
        raise RuntimeError("build ControlNets from the plain UNet (identity attention off)")
    try:
        # An fp8 UNet's float8 weights do not load into a bf16 ControlNet: then its own random init.
        copy = not base.speedups.get("fp8")
        net = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=channels, load_weights_from_unet=copy
        )
        zero_convs = [
            *net.controlnet_down_blocks,
            net.controlnet_mid_block,
            net.controlnet_cond_embedding.conv_out,
        ]
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.02)
    finally:
        torch.random.set_rng_state(state)
    return net
