"""Where a model comes from: turn what the user typed into a ``ModelSource``, and list what is there.

Four kinds of source, one registry:
- ``random:<arch>``: random weights built from an architecture config shipped in the package;
- a diffusers folder (has ``model_index.json``);
- a single-file ``.safetensors`` checkpoint in the original (A1111/ComfyUI) key layout, read with the
  shipped full-size config of its family (detected from the key names); a checkpoint of another shape
  names the shipped config to read it with by a suffix: ``path/to/model.safetensors#arch=tiny-sdxl``
  (the arch must be of the checkpoint's family);
- a Hugging Face hub id (``org/name``), from the local cache or, when allowed and online, downloaded.

Only reading headers happens here (no weights, no torch), so listing models is instant.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from imagegenx.config import ModelSettings
from imagegenx.types import ModelInfo, UserError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ARCH_SUFFIX = re.compile(r"^(?P<ref>.+)#arch=(?P<arch>[^#/\\]*)$")

# Pipeline class → family, for diffusers folders.
_FAMILY_BY_PIPELINE = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionImg2ImgPipeline": "sd15",
    "StableDiffusionInpaintPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl-refiner",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}

# The shipped architecture config used to read a single-file checkpoint of each family.
ARCH_FOR_FAMILY = {"sd15": "sd15", "sd21": "sd21", "sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner"}
# The size each family was trained at: the default image size, and the shape warmed up at load.
NATIVE_SIZE = {"sd15": 512, "sd21": 768, "sdxl": 1024, "sdxl-refiner": 1024, "sd3": 1024, "flux": 1024}


@dataclass(frozen=True)
class ModelSource:
    name: str  # the reference as the user wrote it; also the model's name in metadata
    kind: str  # random, diffusers-folder, single-file, hub
    family: str  # sd15, sd21, sdxl, sdxl-refiner, sd3, flux
    location: str  # arch name, path, or hub id
    inpaint_unet: bool = False  # a 9-channel inpainting UNet
    arch: str | None = None  # single file: the shipped config to read it with (None: ARCH_FOR_FAMILY)

    def info(self, note: str = "") -> ModelInfo:
        return ModelInfo(self.name, self.kind, self.family, self.location, note)


def archs_root() -> Path:
    return Path(str(resources.files("imagegenx.models") / "archs"))


def arch_dir(arch: str) -> Path:
    path = archs_root() / arch
    if arch not in list_archs():  # a name, never a path out of the shipped folder
        known = ", ".join(sorted(list_archs()))
        raise UserError(f"unknown architecture {arch!r}; shipped architectures: {known}")
    return path


@functools.cache  # the shipped configs never change while the process runs
def list_archs() -> tuple[str, ...]:
    return tuple(sorted(p.name for p in archs_root().iterdir() if (p / "model_index.json").is_file()))


@functools.cache  # read once: every job names its model (2.7 ms of disk reads a call on the H200's host)
def arch_family(arch: str) -> str:
    return family_of_folder(arch_dir(arch))


def family_of_folder(folder: Path) -> str:
    index = json.loads((folder / "model_index.json").read_text())
    family = _FAMILY_BY_PIPELINE.get(index.get("_class_name", ""))
    if family is None:
        raise UserError(f"{folder}: unsupported pipeline class {index.get('_class_name')!r}")
    if family == "sd15" and is_sd2(_config(folder, "unet"), _config(folder, "text_encoder")):
        family = "sd21"
    return family


def is_sd2(unet_config: dict, text_encoder_config: dict) -> bool:
    """SD 2.x, told from 1.x by its OpenCLIP-H text encoder (1024 wide, GELU; CLIP-L uses quick GELU)."""
    return unet_config.get("cross_attention_dim") == 1024 or text_encoder_config.get("hidden_act") == "gelu"


def _config(folder: Path, component: str) -> dict:
    path = folder / component / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _unet_config(folder: Path) -> dict:
    return _config(folder, "unet")


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a .safetensors file (names, shapes, dtypes) without reading any weights."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path}: not a .safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise UserError(f"{path}: not a .safetensors file (header size {size} is implausible)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a .safetensors file ({exc})") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise UserError(f"{path}: not a .safetensors file (its header is not a table of tensors)")
    header.pop("__metadata__", None)
    return header


def family_of_single_file(path: Path) -> tuple[str, bool]:
    """Detect the family of an original-layout checkpoint from its key names; also whether it inpaints."""
    header = read_safetensors_header(path)
    keys = header.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    conv_in = header.get("model.diffusion_model.input_blocks.0.0.weight", {}).get("shape", [0, 4])
    inpaint = conv_in[1] == 9
    if has("conditioner.embedders.1.model."):
        return "sdxl", inpaint
    if has("conditioner.embedders.0.model."):
        return "sdxl-refiner", inpaint
    if has("cond_stage_model.model."):
        return "sd21", inpaint
    if has("cond_stage_model.transformer."):
        return "sd15", inpaint
    raise UserError(
        f"{path}: not a Stable Diffusion 1.x/2.x/XL checkpoint in the original key layout; "
        "for SD 3.5 and Flux use a diffusers folder or a hub id"
    )


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{path.name}: refusing to load a pickle checkpoint ({path.suffix}): unpickling can execute "
            "arbitrary code. Convert it to .safetensors (for example with diffusers or a trusted tool) "
            "and load that instead."
        )


def resolve(ref: str, settings: ModelSettings) -> ModelSource:
    """Turn a model reference into a source, or raise ``UserError`` saying what is wrong."""
    ref = ref.strip()
    if not ref:
        raise UserError("no model given")
    if ref.startswith("random:"):
        arch = ref.removeprefix("random:")
        return ModelSource(ref, "random", arch_family(arch), arch)

    suffix = ARCH_SUFFIX.match(ref)
    if suffix is not None:
        return _with_arch(ref, suffix["ref"], suffix["arch"], settings)
    path = _find_local(ref, settings.model_dir)
    if path is not None:
        return _local_source(ref, path)
    if Path(ref).suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(Path(ref))
    if HUB_ID.match(ref) and Path(ref).suffix.lower() != ".safetensors":  # a missing file is no hub id
        if (hub_offline() or not settings.allow_downloads) and not hub_cached(ref):
            raise hub_unavailable(ref)  # say so now, not when the first image would need it
        return ModelSource(ref, "hub", "unknown", ref)
    raise UserError(
        f"model {ref!r} not found: give random:<arch> ({', '.join(list_archs())}), a diffusers folder, "
        f"a .safetensors file, a name in {settings.model_dir}, or a Hugging Face hub id (org/name)"
    )


def _with_arch(ref: str, file_ref: str, arch: str, settings: ModelSettings) -> ModelSource:
    """``<single file>#arch=<shipped arch>``: read the checkpoint with that arch's config."""
    path = _find_local(file_ref, settings.model_dir)
    if path is None:
        raise UserError(f"model {file_ref!r} not found (a #arch= suffix needs a local .safetensors file)")
    source = _local_source(ref, path)
    if source.kind != "single-file":
        raise UserError(f"{path}: #arch= applies only to single-file .safetensors checkpoints")
    family = arch_family(arch)
    if family != source.family:
        raise UserError(
            f"{path}: a {source.family} checkpoint cannot be read with the {family} architecture {arch!r}"
        )
    return replace(source, arch=arch)


def _find_local(ref: str, model_dir: Path) -> Path | None:
    candidates = [Path(ref).expanduser()]
    if not Path(ref).is_absolute():
        candidates += [model_dir / ref, model_dir / f"{ref}.safetensors"]
    return next((p for p in candidates if p.exists()), None)


def _local_source(ref: str, path: Path) -> ModelSource:
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path}: a folder but not a diffusers model (no model_index.json)")
        inpaint = _unet_config(path).get("in_channels") == 9
        return ModelSource(ref, "diffusers-folder", family_of_folder(path), str(path), inpaint)
    refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: unsupported model file type {path.suffix!r}; use .safetensors")
    family, inpaint = family_of_single_file(path)
    return ModelSource(ref, "single-file", family, str(path), inpaint)


def list_models(settings: ModelSettings) -> list[ModelInfo]:
    """Everything ``imagegenx models`` shows: shipped random architectures, then the model folder;
    each says whether requests for it may ask for the tiny decoder."""
    found = [
        ModelInfo(f"random:{arch}", "random", arch_family(arch), f"shipped config {arch}", "random weights")
        for arch in list_archs()
    ]
    if settings.model_dir.is_dir():
        for entry in sorted(settings.model_dir.iterdir()):
            try:
                found.append(_local_source(entry.name, entry).info())
            except UserError as exc:
                found.append(ModelInfo(entry.name, "refused", "-", str(entry), str(exc).split(": ", 1)[-1]))
    return [replace(info, tiny_decoder=bool(settings.tiny_decoder_for(info.family))) for info in found]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def hub_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of ``repo_id`` (its model_index.json)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except ValueError:  # not a valid repo id for the hub
        return False


def hub_unavailable(repo_id: str, detail: str = "") -> UserError:
    """The error for a hub id that is not in the local cache and may not be downloaded now."""
    from huggingface_hub import constants

    why = "this machine is offline (HF_HUB_OFFLINE is set)" if hub_offline() else "downloads are disabled"
    return UserError(
        f"model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and {why}: download it once on a machine with network (`hf download {repo_id}`), "
        f"or pass a local diffusers folder or .safetensors file" + (f" ({detail})" if detail else "")
    )
