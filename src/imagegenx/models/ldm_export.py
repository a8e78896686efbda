"""Write a diffusers SD 1.x / SDXL pipeline as one checkpoint in the original ("LDM") key layout.

That is the layout of the single-file ``.safetensors`` checkpoints users download (CompVis / A1111 /
ComfyUI): ``model.diffusion_model.*`` for the UNet, ``first_stage_model.*`` for the VAE, and the text
encoders under ``cond_stage_model.*`` (SD 1.x) or ``conditioner.embedders.{0,1}.*`` (SDXL; the second
one, OpenCLIP ViT-bigG, in OpenCLIP's own naming). Tests use it to make tiny checkpoints that the
loader then reads back through diffusers' ``from_single_file``; the cold-start benchmark writes a full-size
one the same way.

The UNet and VAE block numbering is derived from the modules themselves (how many resnets each block
has, whether it has attentions, a down- or upsampler), so any ``layers_per_block`` and any mix of
attention / plain blocks maps. Every weight must get an LDM name: a key no rule covers raises, so a
model with parts this module does not know (class embeddings it cannot place, IP adapters, ...) fails
loudly instead of being written without them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# A rule: (diffusers key prefix, LDM key prefix, renames of the part right after the prefix).
# Prefixes end in "." so "resnets.1." never matches "resnets.10.".
Rule = tuple[str, str, Mapping[str, str]]

_NO_RENAMES: Mapping[str, str] = {}

_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
_VAE_CONV_ATTENTION_WEIGHTS = (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")


def _rename(state_dict: Mapping[str, torch.Tensor], rules: list[Rule], what: str) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching rule; raise on keys no rule covers or on name clashes."""
    ordered = sorted(rules, key=lambda rule: len(rule[0]), reverse=True)
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        for src, dst, inner in ordered:
            if not key.startswith(src):
                continue
            rest = key[len(src) :]
            for old, new in inner.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            new_key = dst + rest
            if new_key in out:
                raise ValueError(f"{what}: two weights map to the LDM key {new_key!r}")
            out[new_key] = tensor
            break
        else:
            unmapped.append(key)
    if unmapped:
        raise KeyError(f"{what}: no LDM name for {len(unmapped)} weight(s), e.g. {unmapped[:5]}")
    return out


def _attentions(block: torch.nn.Module) -> list[torch.nn.Module]:
    return [a for a in getattr(block, "attentions", None) or () if a is not None]


def _unet_rules(unet: torch.nn.Module) -> list[Rule]:
    rules: list[Rule] = [
        ("time_embedding.linear_1.", "time_embed.0.", _NO_RENAMES),
        ("time_embedding.linear_2.", "time_embed.2.", _NO_RENAMES),
        ("conv_in.", "input_blocks.0.0.", _NO_RENAMES),
        ("conv_norm_out.", "out.0.", _NO_RENAMES),
        ("conv_out.", "out.2.", _NO_RENAMES),
    ]
    # SDXL's "text_time" embedding (pooled text + size/crop ids) is LDM's label_emb; so is a
    # timestep-style class embedding. Both at once would clash, which _rename reports.
    for name in ("add_embedding", "class_embedding"):
        if hasattr(getattr(unet, name, None), "linear_1"):
            rules.append((f"{name}.linear_1.", "label_emb.0.0.", _NO_RENAMES))
            rules.append((f"{name}.linear_2.", "label_emb.0.2.", _NO_RENAMES))

    # input_blocks: [conv_in], then per down block one entry per resnet (resnet at .0, its
    # attention, if any, at .1), then one for the downsampler (at .0.op) unless it is the last block.
    n = 1
    for b, block in enumerate(unet.down_blocks):
        attentions = _attentions(block)
        for j in range(len(block.resnets)):
            rules.append((f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{n}.0.", _UNET_RESNET))
            if j < len(attentions):
                rules.append((f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{n}.1.", _NO_RENAMES))
            n += 1
        if getattr(block, "downsamplers", None):
            rules.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{n}.0.op.", _NO_RENAMES))
            n += 1

    # middle_block: one sequence, resnet, attention, resnet (, attention, resnet ...).
    mid = unet.mid_block
    if mid is not None:
        attentions = _attentions(mid)
        step = 2 if attentions else 1
        for j in range(len(mid.resnets)):
            rules.append((f"mid_block.resnets.{j}.", f"middle_block.{step * j}.", _UNET_RESNET))
        for j in range(len(attentions)):
            rules.append((f"mid_block.attentions.{j}.", f"middle_block.{2 * j + 1}.", _NO_RENAMES))

    # output_blocks: per up block one entry per resnet (resnet .0, attention .1); the block's last
    # entry also holds the upsampler, right after the attention if there is one (.2), else at .1.
    n = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = _attentions(block)
        last = len(block.resnets) - 1
        for j in range(len(block.resnets)):
            rules.append((f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{n}.0.", _UNET_RESNET))
            slot = 1
            if j < len(attentions):
                rules.append((f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{n}.1.", _NO_RENAMES))
                slot = 2
            if j == last and getattr(block, "upsamplers", None):
                rules.append(
                    (f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{n}.{slot}.conv.", _NO_RENAMES)
                )
            n += 1
    return rules


def _vae_rules(vae: torch.nn.Module) -> list[Rule]:
    rules: list[Rule] = [
        ("quant_conv.", "quant_conv.", _NO_RENAMES),
        ("post_quant_conv.", "post_quant_conv.", _NO_RENAMES),
    ]
    for part in ("encoder", "decoder"):
        coder = getattr(vae, part)
        rules.append((f"{part}.conv_in.", f"{part}.conv_in.", _NO_RENAMES))
        rules.append((f"{part}.conv_norm_out.", f"{part}.norm_out.", _NO_RENAMES))
        rules.append((f"{part}.conv_out.", f"{part}.conv_out.", _NO_RENAMES))
        for j in range(len(coder.mid_block.resnets)):
            rules.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", _VAE_RESNET))
        attentions = _attentions(coder.mid_block)
        if len(attentions) > 1:
            raise NotImplementedError("LDM VAEs have at most one mid-block attention (mid.attn_1)")
        if attentions:
            rules.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION))

    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            rules.append(
                (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
            )
        if getattr(block, "downsamplers", None):
            rules.append(
                (
                    f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                    f"encoder.down.{i}.downsample.conv.",
                    _NO_RENAMES,
                )
            )

    # The LDM decoder numbers its levels by resolution (up.0 is the full-resolution one, run last);
    # diffusers numbers them in execution order.
    levels = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = levels - 1 - i
        for j in range(len(block.resnets)):
            rules.append(
                (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{level}.block.{j}.", _VAE_RESNET)
            )
        if getattr(block, "upsamplers", None):
            rules.append(
                (
                    f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                    f"decoder.up.{level}.upsample.conv.",
                    _NO_RENAMES,
                )
            )
    return rules


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights in LDM names, without the ``model.diffusion_model.`` prefix."""
    return _rename(unet.state_dict(), _unet_rules(unet), "UNet")


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights in LDM names, without the ``first_stage_model.`` prefix."""
    out = _rename(vae.state_dict(), _vae_rules(vae), "VAE")
    # The LDM mid-block attention projects with 1x1 convolutions, diffusers' with linear layers.
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith(_VAE_CONV_ATTENTION_WEIGHTS) and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


def _text_model_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Encoder weights as ``text_model.*`` (+ ``text_projection.*``), whatever the transformers version.

    transformers >= 5.6 dropped the ``text_model.`` level from ``CLIPTextModel`` (not from
    ``CLIPTextModelWithProjection``); checkpoints keep it.
    """
    state = encoder.state_dict()
    if hasattr(encoder, "text_model"):
        return dict(state)
    return {f"text_model.{key}": tensor for key, tensor in state.items()}


def clip_to_ldm(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """OpenAI CLIP text encoder (CLIP-L) weights as stored under ``...transformer.`` in checkpoints."""
    state = _text_model_state(encoder)
    stray = [key for key in state if not key.startswith("text_model.")]
    if stray:
        raise KeyError(f"CLIP text encoder: no LDM name for {stray}")
    return state


def open_clip_to_ldm(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection weights in OpenCLIP names (SDXL's bigG, under ``...model.``).

    q/k/v become one ``attn.in_proj_*`` (torch.nn.MultiheadAttention's packing, q first), and the
    projection is stored transposed, as OpenCLIP applies it as ``x @ text_projection``.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, tensor in _text_model_state(encoder).items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.removeprefix("text_model.final_layer_norm.")] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.t()
        elif match := _QKV.fullmatch(key):
            layer, which, kind = match.groups()
            qkv.setdefault(f"transformer.resblocks.{layer}.attn.in_proj_{kind}", {})[which] = tensor
        elif (match := _LAYER.fullmatch(key)) and (
            old := next((o for o in _OPEN_CLIP_LAYER if match[2].startswith(o)), None)
        ):
            out[f"transformer.resblocks.{match[1]}.{_OPEN_CLIP_LAYER[old]}{match[2][len(old) :]}"] = tensor
        else:
            unmapped.append(key)
    if unmapped:
        raise KeyError(f"OpenCLIP text encoder: no LDM name for {unmapped[:5]}")
    for name, parts in qkv.items():
        if parts.keys() != {"q", "k", "v"}:
            raise KeyError(f"OpenCLIP text encoder: {name} lacks one of q/k/v (has {sorted(parts)})")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: tensor for key, tensor in state.items()}


def to_ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) as one state dict in the original checkpoint layout.

    ``StableDiffusionPipeline`` (SD 1.x, CLIP-L under ``cond_stage_model.transformer.``) or
    ``StableDiffusionXLPipeline`` (CLIP-L under ``conditioner.embedders.0.transformer.``, bigG under
    ``conditioner.embedders.1.model.``). Tensors may share memory with the pipeline's parameters.
    """
    state = _prefixed(UNET_PREFIX, unet_to_ldm(pipe.unet)) | _prefixed(VAE_PREFIX, vae_to_ldm(pipe.vae))
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    if text_encoder_2 is None:
        state |= _prefixed(SD1_CLIP_PREFIX, clip_to_ldm(pipe.text_encoder))
    elif pipe.text_encoder is None:
        raise NotImplementedError(
            "SDXL refiner layout (bigG alone, at conditioner.embedders.0) is not written"
        )
    else:
        state |= _prefixed(SDXL_CLIP_L_PREFIX, clip_to_ldm(pipe.text_encoder))
        state |= _prefixed(SDXL_OPEN_CLIP_PREFIX, open_clip_to_ldm(text_encoder_2))
    return state


def save_ldm_checkpoint(pipe, path: str | Path) -> Path:
    """Write ``to_ldm_state_dict(pipe)`` as a single ``.safetensors`` file; returns its path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in to_ldm_state_dict(pipe).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
