"""Write random LoRA files (diffusers/peft format and kohya) for tests and the LoRA-switch benchmark.

Both take a tiny pipeline's components and give every LoRA tensor random non-zero values, so that an
active LoRA visibly changes the output. Components are deep-copied; the caller's stay untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

# A LoRA over most of the UNet (attention, feed-forward, projections, resnet convs), like LCM-LoRA.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
UNET_TARGETS_WITH_CONV = (*UNET_TARGETS, "conv1", "conv2", "time_emb_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _randomize(model: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def write_peft_lora(
    path: Path,
    pipeline_cls,
    components: dict,
    *,
    unet_targets=UNET_TARGETS_WITH_CONV,
    text_encoders: tuple[str, ...] = ("text_encoder",),
    rank: int = 4,
    seed: int = 0,
    scale: float = 0.1,
    hub_layout: bool = True,
) -> Path:
    """A diffusers-format file (``unet.…lora_A.weight``, ``text_encoder.…``) as diffusers writes it.

    ``hub_layout``: text encoder keys start ``text_model.`` as in files written with transformers 4
    (nearly every published LoRA); False keeps what the installed transformers names them.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for component, targets in [("unet", unet_targets)] + [(te, TEXT_TARGETS) for te in text_encoders]:
        if not targets:
            continue
        model = copy.deepcopy(components[component])
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
        _randomize(model, generator, scale)
        state = get_peft_model_state_dict(model)
        if hub_layout and component != "unet" and not hasattr(model, "text_model"):
            state = {f"text_model.{k}": v for k, v in state.items()}
        layers[f"{component}_lora_layers"] = state
    pipeline_cls.save_lora_weights(path.parent, weight_name=path.name, safe_serialization=True, **layers)
    return path


def _kohya_tensors(prefix: str, model: torch.nn.Module, suffixes, rank, alpha, generator, scale):
    tensors = {}
    # kohya names CLIP layers text_model_encoder_…, whatever the installed transformers calls them.
    if prefix.startswith("lora_te") and not hasattr(model, "text_model"):
        prefix += "text_model_"
    for name, module in model.named_modules():
        if not name.endswith(tuple(f".{s}" for s in suffixes)):
            continue
        key = prefix + name.replace(".", "_")
        weight = module.weight
        if weight.ndim == 4:  # conv: down keeps the kernel, up is 1x1
            down_shape = (rank, weight.shape[1], *weight.shape[2:])
            up_shape = (weight.shape[0], rank, 1, 1)
        else:
            down_shape, up_shape = (rank, weight.shape[1]), (weight.shape[0], rank)
        tensors[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * scale
        tensors[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * scale
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def write_kohya_lora(
    path: Path,
    components: dict,
    *,
    unet_targets=UNET_TARGETS_WITH_CONV,
    text_prefixes: dict[str, str] | None = None,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 1,
    scale: float = 0.1,
) -> Path:
    """A kohya/A1111-format file: ``lora_unet_…`` and ``lora_te1_…`` keys with down/up/alpha."""
    text_prefixes = {"text_encoder": "lora_te1_"} if text_prefixes is None else text_prefixes
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    if unet_targets:
        tensors |= _kohya_tensors(
            "lora_unet_", components["unet"], unet_targets, rank, alpha, generator, scale
        )
    for component, prefix in text_prefixes.items():
        tensors |= _kohya_tensors(prefix, components[component], TEXT_TARGETS, rank, alpha, generator, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"ss_network_dim": "4"})
    return path


def write_unet_loras(folder: Path, components: dict, names: Sequence[str], rank: int) -> list[Path]:
    """UNet-only kohya LoRAs ``folder/NAME.safetensors``, one per name (seeds 0, 1, ...): style LoRAs
    as the cold-start scenario switches between them."""
    return [
        write_kohya_lora(
            folder / f"{name}.safetensors",
            components,
            unet_targets=UNET_TARGETS,
            text_prefixes={},
            rank=rank,
            seed=seed,
        )
        for seed, name in enumerate(names)
    ]
