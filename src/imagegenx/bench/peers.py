"""The peers every scenario runs beside us, in the same process, on the same architecture:

- ``diffusers``: the plain pipeline, fp16, PyTorch SDPA attention, eager: what most services run;
- ``diffusers-fast``: diffusers' own published fast recipe ("Accelerate inference of text-to-image
  diffusion models"): bf16, SDPA, channels_last, fused QKV projections, Inductor's conv-1x1-as-mm
  and coordinate-descent tuning flags, and ``torch.compile(mode="max-autotune", fullgraph=True)``
  of the UNet and the VAE decoder. On the CPU (smoke mode) the compile is left out.

Each peer is loaded separately from the engine's model (same random weights: the same seed builds
the same model), so the engine's own speed-ups never leak into a peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from imagegenx.config import ModelSettings
from imagegenx.models.loader import LoadedModel, load_model
from imagegenx.models.sources import resolve

PEERS = ("diffusers", "diffusers-fast")


@dataclass
class Peer:
    name: str
    model: LoadedModel
    note: str = ""
    saved_inductor: dict[str, Any] | None = None  # Inductor's flags before this peer set its own

    def close(self) -> None:
        """Give back Inductor's flags, so the recipe's never leak into a later scenario's compile."""
        if self.saved_inductor is not None:
            import torch._inductor.config as inductor

            inductor.load_config(self.saved_inductor)
            self.saved_inductor = None

    @property
    def pipe(self) -> Any:
        return self.model.pipe

    def generate(self, prompts: list[str], *, width: int, height: int, steps: int, cfg: float, seed: int):
        """One pipeline call for ``len(prompts)`` images; returns PIL images."""
        device = self.model.device
        generator = torch.Generator(device.type).manual_seed(seed)
        return self.pipe(
            prompt=prompts,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=generator,
            output_type="pil",
        ).images


def load_peer(
    name: str, ref: str, base: ModelSettings, compile_mode: str = "max-autotune", decoder: str = "full"
) -> Peer:
    """A peer pipeline for model ``ref`` configured as ``name`` says (see the module docstring);
    ``decoder="tiny"``: with the model's tiny decoder as its VAE, as diffusers' docs use TAESD."""
    cuda = torch.cuda.is_available() and base.device in ("auto", "cuda")
    plain = base.model_copy(update={"channels_last": False, "fuse_qkv": False, "compile": "off"})
    if name == "diffusers":
        settings = plain.model_copy(update={"dtype": "float16" if cuda else "float32"})
        return Peer(
            name, _with_decoder(load_model(resolve(ref, settings), settings), decoder), "fp16, SDPA, eager"
        )
    if name != "diffusers-fast":
        raise ValueError(f"unknown peer {name!r}; peers: {', '.join(PEERS)}")
    settings = plain.model_copy(update={"dtype": "bfloat16" if cuda else "float32"})
    model = _with_decoder(load_model(resolve(ref, settings), settings), decoder)
    pipe = model.pipe
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    denoiser.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if hasattr(denoiser, "fuse_qkv_projections"):
        denoiser.fuse_qkv_projections()
    if hasattr(pipe.vae, "fuse_qkv_projections"):
        pipe.vae.fuse_qkv_projections()
    if not cuda or compile_mode == "off":
        return Peer(name, model, "bf16, channels_last, fused QKV, no compile")
    import torch._inductor.config as inductor

    saved = inductor.get_config_copy()
    inductor.conv_1x1_as_mm = True
    inductor.epilogue_fusion = False
    note = f"bf16, channels_last, fused QKV, compile {compile_mode}"
    if compile_mode == "max-autotune":  # the recipe as published
        inductor.coordinate_descent_tuning = True
        inductor.coordinate_descent_check_all_directions = True
    else:  # its tuning passes left out: on an H200 they take longer than one GPU call may run
        note += " without coordinate-descent tuning"
    denoiser.forward = torch.compile(denoiser.forward, mode=compile_mode, fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode, fullgraph=True)
    return Peer(name, model, note, saved)


def _with_decoder(model: LoadedModel, decoder: str) -> LoadedModel:
    if decoder == "tiny":
        model.pipe.vae = model.tiny_decoder  # loaded with the model: ModelSettings.tiny_decoders
    return model
