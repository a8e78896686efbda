"""Identity adapters: a face embedding → identity tokens that every cross-attention layer of the
UNet also attends to (IP-Adapter attention, scaled by the identity scale). InstantID's adapter
(a Resampler: 16 tokens) and the IP-Adapter FaceID variant (a feed-forward projection: 4 tokens)
are both this; they differ in the projection, which diffusers' loader recognises from the weights.

The other half of InstantID, IdentityNet, is a ControlNet on the face-keypoint image
(models/controlnet.py); it reads the identity tokens instead of the prompt.

A reference is ``random:instantid`` or ``random:faceid`` (random weights in the base model's
shapes, for tests and speed measurements) or a ``.safetensors`` file in the model folder (or a path)
holding InstantID's ``ip-adapter.bin`` converted without pickle: its ``image_proj.*`` (the
Resampler) and ``ip_adapter.*`` (the attention projections) tensors under those prefixes; an
IP-Adapter FaceID file likewise. Built with diffusers' own IP-Adapter classes and loader, once per
base model.

The adapter is switched on for a batch that asks for an identity and off for the others, so one
resident UNet serves both without reloading (``use``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagegenx.config import ModelSettings
from imagegenx.models.loader import LoadedModel
from imagegenx.types import UserError

RANDOM_INSTANTID = "random:instantid"
RANDOM_FACEID = "random:faceid"
FACEID_TOKENS = 4
ARCFACE_DIM = 512  # InstantID's face embedding (ArcFace, antelopev2)
NUM_TOKENS = 16


@dataclass
class IdentityAdapter:
    projection: Any  # diffusers MultiIPAdapterImageProjection
    processors: dict[str, Any]  # attention processor per UNet attention layer, with identity attention
    plain: dict[str, Any]  # the UNet's own processors, restored for batches without an identity
    embedding_dim: int

    def use(self, unet: Any, scale: float | None) -> None:
        """Switch identity attention on at ``scale``, or off (``None``)."""
        if scale is None:
            if unet.encoder_hid_proj is not None:
                _set_processors(unet, self.plain)
                unet.encoder_hid_proj = None
                unet.register_to_config(encoder_hid_dim_type=None)
            return
        for processor in self.processors.values():
            if hasattr(processor, "scale"):
                processor.scale = [scale]
        if unet.encoder_hid_proj is not self.projection:
            _set_processors(unet, self.processors)
            unet.encoder_hid_proj = self.projection
            unet.register_to_config(encoder_hid_dim_type="ip_image_proj")

    def tokens(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(rows, dim) face embeddings → (rows, tokens, cross-attention dim) identity tokens."""
        return self.projection([embeddings[:, None, None, :]])[0][:, 0]


def load_identity_adapter(ref: str, base: LoadedModel, settings: ModelSettings) -> IdentityAdapter:
    if not base.uses_engine_loop:
        raise UserError(f"InstantID needs an SD 1.5, SD 2.x or SDXL base model, not {base.family}")
    unet = base.pipe.unet
    plain = dict(unet.attn_processors)
    if ref in (RANDOM_INSTANTID, RANDOM_FACEID):
        projection, processors = _random_adapter(unet, faceid=ref == RANDOM_FACEID)
    else:
        projection, processors = _from_file(_file(ref, settings), unet)
    # The embedding size is what the projection's first linear layer takes.
    first = next(m for m in projection.modules() if isinstance(m, torch.nn.Linear))
    dim = first.in_features
    projection.to(base.device, base.dtype)
    for processor in processors.values():
        if isinstance(processor, torch.nn.Module):
            processor.to(base.device, base.dtype)
    return IdentityAdapter(projection, processors, plain, dim)


def _file(ref: str, settings: ModelSettings) -> Path:
    name = ref if ref.endswith(".safetensors") else f"{ref}.safetensors"
    for path in (settings.model_dir / name, Path(ref).expanduser()):
        if path.is_file() and path.suffix == ".safetensors":
            return path
    raise UserError(
        f"no InstantID adapter {ref!r}: expected a .safetensors file (InstantID's ip-adapter converted "
        f"without pickle) in {settings.model_dir}, or {RANDOM_INSTANTID}"
    )


def _from_file(path: Path, unet: Any) -> tuple[Any, dict[str, Any]]:
    """diffusers' own IP-Adapter loader on the file's two halves; then the UNet is put back as it was."""
    from safetensors.torch import load_file

    flat = load_file(path)
    state = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        prefix, _, rest = key.partition(".")
        if prefix not in state:
            raise UserError(f"{path}: unexpected tensor {key!r} (expected image_proj.* and ip_adapter.*)")
        state[prefix][rest] = value
    plain = dict(unet.attn_processors)
    try:
        unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"{path}: not an InstantID / IP-Adapter Plus adapter for this model ({exc})"
        ) from None
    projection, processors = unet.encoder_hid_proj, dict(unet.attn_processors)
    _set_processors(unet, plain)
    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)
    return projection, processors


def _random_adapter(unet: Any, faceid: bool) -> tuple[Any, dict[str, Any]]:
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import (
        IPAdapterFaceIDImageProjection,
        IPAdapterPlusImageProjection,
        MultiIPAdapterImageProjection,
    )

    config = unet.config
    cross = config.cross_attention_dim
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        # InstantID's Resampler shape, narrowed to the UNet's width for tiny test models.
        hidden = min(1280, cross * 2)
        heads = max(1, hidden // 64)
        if faceid:
            tokens = FACEID_TOKENS
            layer = IPAdapterFaceIDImageProjection(ARCFACE_DIM, cross, mult=1, num_tokens=tokens)
        else:
            tokens = NUM_TOKENS
            layer = IPAdapterPlusImageProjection(
                embed_dims=ARCFACE_DIM, output_dims=cross, hidden_dims=hidden, depth=4,
                dim_head=hidden // heads, heads=heads, num_queries=tokens, ffn_ratio=4,
            )  # fmt: skip
        processors: dict[str, Any] = {}
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                processors[name] = AttnProcessor2_0()
            else:
                processors[name] = IPAdapterAttnProcessor2_0(
                    _hidden_size(name, config.block_out_channels), cross, num_tokens=(tokens,)
                )
    finally:
        torch.random.set_rng_state(state)
    return MultiIPAdapterImageProjection([layer]), processors


def _set_processors(unet: Any, processors: dict[str, Any]) -> None:
    """Put each attention layer's processor back by name. (``set_attn_processor`` counts processor
    modules among the layers once identity processors, which are modules, are in place.)"""
    for name, module in unet.named_modules():
        if hasattr(module, "set_processor") and f"{name}.processor" in processors:
            module.set_processor(processors[f"{name}.processor"])


def _hidden_size(name: str, channels: tuple[int, ...]) -> int:
    """The width of the UNet block an attention layer sits in, from its name (as diffusers does)."""
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return channels[::-1][block] if name.startswith("up_blocks") else channels[block]
