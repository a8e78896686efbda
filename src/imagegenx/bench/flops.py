"""FLOPs of one image of a bench workload: every denoiser step and the decode, counted by PyTorch's
FLOP counter (matmuls and convolutions) on the loaded model with random inputs of the real shapes.

The UNet families run two rows a step with classifier-free guidance (one for LCM-distilled UNets,
whose guidance is an embedding); SD 3.5 too; Flux.1-dev one (its guidance is distilled into an
embedding). Transformers take the text as diffusers' pipelines give it by default: Flux T5's 512
tokens, SD 3.5 CLIP's 77 and T5's 256.
"""

from __future__ import annotations

from typing import Any

import torch

from imagegenx.bench.measure import count_tflop
from imagegenx.models.fastload import example_unet_inputs
from imagegenx.models.loader import LoadedModel

FLUX_TEXT_TOKENS = 512  # FluxPipeline's max_sequence_length
SD3_TEXT_TOKENS = 77 + 256  # CLIP, then T5 at StableDiffusion3Pipeline's max_sequence_length


def image_tflop(model: LoadedModel, work: Any) -> float:
    """TFLOP of one image of ``work`` (its size, steps, CFG and decoder) on ``model``."""
    pipe = model.pipe
    side = work.size // model.vae_scale_factor
    denoiser = getattr(pipe, "unet", None)
    if denoiser is not None:
        rows = 2 if work.cfg > 1 and denoiser.config.time_cond_proj_dim is None else 1
        args, kwargs = example_unet_inputs(denoiser, rows, side, model.family)
    else:
        denoiser = pipe.transformer
        args, kwargs = (), transformer_inputs(denoiser, model.family, side, work.cfg)
    # The class's forward, not the instance's: a compiled forward hides its operations from the counter.
    step = count_tflop(lambda: type(denoiser).forward(denoiser, *args, **kwargs))
    vae = model.tiny_decoder if work.decoder == "tiny" else pipe.vae
    latents = torch.randn(1, vae.config.latent_channels, side, side, device=model.device, dtype=vae.dtype)
    decode = count_tflop(lambda: vae.decode(latents))
    return work.steps * step + decode


def transformer_inputs(transformer: Any, family: str, side: int, cfg: float) -> dict[str, Any]:
    """Random keyword inputs for one step of an SD 3.5 or Flux transformer on ``side``² latents."""
    config, device, dtype = transformer.config, transformer.device, transformer.dtype

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    if family == "flux":  # latents packed 2x2 into tokens, with their (0, row, column) ids
        tokens = (side // 2) ** 2
        inputs = {
            "hidden_states": randn(1, tokens, config.in_channels),
            "encoder_hidden_states": randn(1, FLUX_TEXT_TOKENS, config.joint_attention_dim),
            "pooled_projections": randn(1, config.pooled_projection_dim),
            "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
            "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
            "txt_ids": torch.zeros(FLUX_TEXT_TOKENS, 3, device=device, dtype=dtype),
        }
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
        return inputs
    rows = 2 if cfg > 1 else 1
    return {
        "hidden_states": randn(rows, config.in_channels, side, side),
        "encoder_hidden_states": randn(rows, SD3_TEXT_TOKENS, config.joint_attention_dim),
        "pooled_projections": randn(rows, config.pooled_projection_dim),
        "timestep": torch.full((rows,), 500.0, device=device, dtype=dtype),
    }
