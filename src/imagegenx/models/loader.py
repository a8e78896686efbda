"""Build the components of a model from its source, once.

A loaded model is a diffusers pipeline object used as a container of components (UNet or
transformer, VAE, text encoders, tokenizers, scheduler config) and as the LoRA loader. The engine
runs its own denoising loop over those components for the UNet families; diffusers' ``__call__``
is used as-is only for SD 3.5 and Flux.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imagegenx.config import ModelSettings
from imagegenx.models.sources import (
    ARCH_FOR_FAMILY,
    ModelSource,
    arch_dir,
    family_of_folder,
    hub_offline,
    hub_unavailable,
    is_sd2,
)
from imagegenx.models.speed import apply_speedups
from imagegenx.models.tiny_decoder import load_tiny_decoder
from imagegenx.models.tokenizers import tokenizer_for
from imagegenx.types import UserError

_FAMILY_BY_PIPELINE_CLASS = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl-refiner",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
log = logging.getLogger(__name__)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedModel:
    source: ModelSource
    pipe: Any
    family: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    extras: dict[str, Any] = field(default_factory=dict)  # per-model caches owned by other rooms
    speedups: dict[str, Any] = field(default_factory=dict)  # what models/speed.py applied
    # Which loader read the weights ("fast" or "diffusers") and, for the fast one, where the time went.
    load_split: dict[str, Any] = field(default_factory=dict)
    # The family's tiny decoder when ModelSettings.tiny_decoders names one (models/tiny_decoder.py).
    tiny_decoder: Any = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def uses_engine_loop(self) -> bool:
        """The UNet families run through the engine's own batched loop."""
        return self.family in {"sd15", "sd21", "sdxl", "sdxl-refiner"}


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if setting not in _DTYPES:
        raise UserError(f"unknown dtype {setting!r}; use one of {', '.join(_DTYPES)} or auto")
    return _DTYPES[setting]


def load_model(source: ModelSource, settings: ModelSettings) -> LoadedModel:
    """Read or build every component of ``source`` and put it on the configured device."""
    # 1. Where and in what precision.
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    started = time.perf_counter()

    # 2. Components from the source.
    split: dict[str, Any] = {"loader": "diffusers"}
    if source.kind == "random":
        pipe = _build_random(source.location, device, dtype)
    elif source.kind == "diffusers-folder":
        pipe, split = _folder(Path(source.location), device, dtype)
    elif source.kind == "single-file":
        pipe, split = _single_file(source, device, dtype)
    elif source.kind == "hub":
        pipe = _from_hub(source.location, dtype, settings.allow_downloads)
    else:
        raise ValueError(f"unknown source kind {source.kind}")

    # 3. Device, eval mode, quiet.
    moved = time.perf_counter()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    sped = time.perf_counter()
    speedups = apply_speedups(pipe, device, settings)
    split |= {"to_device": sped - moved, "speedups": time.perf_counter() - sped}
    family = _FAMILY_BY_PIPELINE_CLASS.get(type(pipe).__name__, source.family)
    encoder = getattr(pipe, "text_encoder", None)
    if family == "sd15" and is_sd2(dict(pipe.unet.config), encoder.config.to_dict() if encoder else {}):
        family = "sd21"
    tiny = load_tiny_decoder(pipe, family, settings)
    seconds = time.perf_counter() - started
    return LoadedModel(
        source, pipe, family, device, dtype, seconds, speedups=speedups, load_split=split, tiny_decoder=tiny
    )


def _pipeline_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UserError(f"unsupported pipeline class {name!r}")
    return cls


def _build_random(arch: str, device: torch.device, dtype: torch.dtype):
    """Random weights from a shipped architecture config; seeded, so the same arch gives the same model."""
    import diffusers
    import transformers

    folder = arch_dir(arch)
    index = json.loads((folder / "model_index.json").read_text())
    family = family_of_folder(folder)
    components: dict[str, Any] = {}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list):
                continue
            library, class_name = spec
            if class_name is None:
                components[name] = None
            elif name.startswith("tokenizer"):
                components[name] = tokenizer_for(family, name)
            elif name == "scheduler":
                components[name] = getattr(diffusers, class_name).from_pretrained(folder, subfolder=name)
            elif library == "diffusers":
                cls = getattr(diffusers, class_name)
                with torch.device(device):
                    components[name] = _cast(cls.from_config(cls.load_config(folder / name)), dtype)
            else:
                cls = getattr(transformers, class_name)
                config = transformers.AutoConfig.from_pretrained(folder / name)
                with torch.device(device):
                    components[name] = _cast(cls(config), dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    for model in components.values():
        if isinstance(model, torch.nn.Module):
            model.eval()
    # Pipeline options stored beside the components (requires_aesthetics_score, force_zeros_...).
    options = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    if family in {"sd15", "sd21"}:
        options["requires_safety_checker"] = False
    return _pipeline_class(index["_class_name"])(**components, **options)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The whole module in ``dtype``: a config's own ``torch_dtype`` (SDXL's text_encoder_2 says
    float16) builds most layers in it but not all (its text_projection stayed float32), which made
    every random:sdxl prompt encode fail on a CPU."""
    return module.to(dtype)


def _folder(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """A diffusers folder: its diffusers models by the fast loader (models/fastload.py), the rest
    (text encoders, tokenizers, scheduler, and any model it declines) by ``from_pretrained``."""
    from imagegenx.models import fastload

    models, split = fastload.load_folder_models(folder, device, dtype)
    pipe = _from_pretrained(folder, dtype, local_only=True, components=models)
    return pipe, {"loader": "fast" if models else "diffusers", "fast_components": sorted(models), **split}


def _from_pretrained(
    folder: Path | str, dtype: torch.dtype, local_only: bool, components: dict[str, Any] | None = None
):
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(folder, local_files_only=local_only)
    cls = _pipeline_class(config["_class_name"])
    # Only .safetensors weights: a folder of .bin pickles is refused, not unpickled.
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": local_only, "use_safetensors": True}
    if "safety_checker" in config:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    kwargs |= components or {}  # already loaded: from_pretrained takes them as they are
    try:
        return cls.from_pretrained(folder, **kwargs)
    except OSError as exc:
        if "safetensors" not in str(exc):
            raise
        raise UserError(
            f"{folder}: {str(exc).rstrip('.')}. Only .safetensors weights are loaded: pickle weights "
            "(.bin, .ckpt) are refused because unpickling can execute arbitrary code"
        ) from None


def _single_file(source: ModelSource, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """The fast loader (models/fastload.py); diffusers' ``from_single_file`` for what it does not handle.

    Falls back for SD 2.x and SDXL refiner checkpoints, unusual tensor dtypes, and any checkpoint
    that does not fit the shipped config (so the error the user sees is diffusers' path's own).
    """
    from imagegenx.models import fastload

    folder = arch_dir(source.arch or ARCH_FOR_FAMILY[source.family])
    try:
        pipe, split = fastload.load_single_file(
            Path(source.location), source.family, folder, device, dtype, inpaint=source.inpaint_unet
        )
        return pipe, {"loader": "fast", **split}
    except fastload.FastLoadUnsupported as exc:
        log.info("%s: read by diffusers' from_single_file (%s)", source.location, exc)
    return _from_single_file(source, dtype), {"loader": "diffusers"}


def _from_single_file(source: ModelSource, dtype: torch.dtype):
    """An original-layout checkpoint, read with diffusers' converter and our shipped configs: no network."""
    arch = source.arch or ARCH_FOR_FAMILY[source.family]
    folder = arch_dir(arch)
    index = json.loads((folder / "model_index.json").read_text())
    cls = _pipeline_class(index["_class_name"])
    tokenizers = {
        name: tokenizer_for(source.family, name)
        for name, spec in index.items()
        if name.startswith("tokenizer") and isinstance(spec, list) and spec[1]
    }
    kwargs: dict[str, Any] = {"config": str(folder), "local_files_only": True, "torch_dtype": dtype}
    if "safety_checker" in index:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    if source.inpaint_unet:
        kwargs["num_in_channels"] = 9
    try:
        return cls.from_single_file(source.location, **tokenizers, **kwargs)
    except (ValueError, KeyError, RuntimeError) as exc:  # diffusers: weights that do not fit the config
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(
            f"{source.location}: does not fit the shipped {arch!r} architecture ({reason}); for a "
            f"checkpoint of another shape, name a shipped config: {source.location}#arch=<arch>"
        ) from None


def _from_hub(repo_id: str, dtype: torch.dtype, allow_downloads: bool):
    """From the local cache; downloaded only when allowed and online. Never needed at run time."""
    try:
        return _from_pretrained(repo_id, dtype, local_only=True)
    except UserError:
        raise
    except (OSError, ValueError) as cached_error:
        if hub_offline() or not allow_downloads:
            raise hub_unavailable(repo_id, cached_error.__class__.__name__) from None
    try:
        return _from_pretrained(repo_id, dtype, local_only=False)
    except OSError as exc:
        raise UserError(f"model {repo_id!r} could not be downloaded: {exc}") from None
