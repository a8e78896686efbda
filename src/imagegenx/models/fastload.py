"""Fast load of a single-file SD 1.x / SDXL checkpoint: the file's bytes straight into device tensors.

diffusers' ``from_single_file`` reads the whole file into CPU memory, converts the keys there and
then ``pipe.to(device)`` copies every weight again (7.5 s for a 6.9 GB SDXL file on an H200). Here:

1. the modules are built on the meta device from the shipped configs (accelerate's
   ``init_empty_weights``, as diffusers does), so no weight is randomly initialised;
2. the tensors are read straight into device memory by ``models/fastread.py`` (large ``pread``
   calls on several threads; on CUDA through pinned staging buffers) and cast there;
3. diffusers' own key converters (``convert_ldm_*_checkpoint``, ``convert_open_clip_checkpoint``)
   rename the device tensors (only renames, slices and a transpose: no arithmetic), and the modules
   take them with ``load_state_dict(assign=True)``: no copy;
4. on CUDA, while the UNet's bytes are still being read (on a second thread), the text encoders, the
   VAE decoder and a stand-in UNet run once on dummy inputs so the first image does not pay for
   loading cuBLAS/cuDNN and their plans. They run on the calling thread, the engine's: cuDNN keeps
   its convolution plans and attention graphs per thread, so a warm-up on another thread leaves the
   engine's to build them all again at its first image.

The result is bit-identical to diffusers' path (``tests/test_fastload.py``). What this path does
not handle raises ``FastLoadUnsupported`` and the loader falls back to ``from_single_file``: SD 2.x
and the SDXL refiner (OpenCLIP-only layouts no test writes), tensor dtypes fastread does not know,
checkpoints lacking weights the config needs, and any file that does not fit the config.
"""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from imagegenx.models.fastread import (
    READ_THREADS,
    FastLoadUnsupported,
    Staging,
    TensorSpec,
    read_tensors,
    tensor_table,
)
from imagegenx.models.sources import NATIVE_SIZE
from imagegenx.models.speed import decode_dtype
from imagegenx.models.tokenizers import tokenizer_for

__all__ = ["FAMILIES", "FastLoadUnsupported", "load_folder_models", "load_single_file"]

FAMILIES = frozenset({"sd15", "sdxl"})
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")


def load_single_file(
    path: Path,
    family: str,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    inpaint: bool = False,
    warm: bool | None = None,
    direct: bool = False,
) -> tuple[Any, dict[str, float]]:
    """The pipeline of the ``family`` checkpoint at ``path``, read with the shipped config in ``folder``.

    Returns the pipeline and where the time went (seconds: ``read_text_vae``, ``read_unet``,
    ``build_text_vae`` and ``warm`` (during the UNet's read), ``build_unet``; and ``gigabytes``).
    ``warm`` (default: on CUDA) runs the text encoders and the VAE decoder once, overlapped with the
    UNet's read. ``direct`` (CUDA only) reads with ``O_DIRECT``, past the page cache.
    """
    if family not in FAMILIES:
        raise FastLoadUnsupported(f"family {family} is read by diffusers' from_single_file")
    import diffusers

    started = time.perf_counter()
    index = json.loads((folder / "model_index.json").read_text())
    specs = tensor_table(path)
    first = [s for s in specs if s.name.startswith((*TEXT_PREFIXES, VAE_PREFIX))]
    unet_specs = [s for s in specs if s.name.startswith(UNET_PREFIX)]
    split: dict[str, float] = {"gigabytes": sum(s.nbytes for s in (*first, *unet_specs)) / 1e9}

    # 1. Text encoders and VAE first (they come first in a sorted file), then, while a second thread
    # reads the UNet's bytes, this thread builds those components and the empty UNet, and warms up.
    staging = Staging(device, READ_THREADS, direct=direct) if device.type == "cuda" else None
    tensors = read_tensors(path, first, device, dtype, staging=staging)
    split["read_text_vae"] = time.perf_counter() - started
    warm = device.type == "cuda" if warm is None else warm
    with ThreadPoolExecutor(1, thread_name_prefix="fastload-read") as pool:
        reading: Future = pool.submit(_timed_read, path, unet_specs, device, dtype, staging)
        try:
            components = _build_text_vae(index, folder, family, tensors, device, dtype, warm, inpaint)
        finally:
            unet_tensors, split["read_unet"] = reading.result()  # the read ends before an error leaves
    split["build_text_vae"] = components.pop("_build_seconds")
    split["warm"] = components.pop("_warm_seconds")

    # 2. The UNet's weights, then the pipeline around the components.
    built = time.perf_counter()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet, config = components.pop("_unet")
    _assign(unet, _convert("unet", convert_ldm_unet_checkpoint, unet_tensors, config), device, dtype, "unet")
    components["unet"] = unet
    for name, spec in index.items():
        if name in components or name.startswith("_") or not isinstance(spec, list):
            continue
        if name.startswith("tokenizer"):
            components[name] = tokenizer_for(family, name)
        elif name == "scheduler":
            components[name] = getattr(diffusers, spec[1]).from_pretrained(folder, subfolder=name)
        elif spec[1] is None or name == "safety_checker":
            components[name] = None
        else:
            raise FastLoadUnsupported(f"component {name} ({spec[1]}) is not built by the fast path")
    options = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    if "safety_checker" in index:
        options["requires_safety_checker"] = False
    pipe = getattr(diffusers, index["_class_name"])(**components, **options)
    split["build_unet"] = time.perf_counter() - built
    return pipe, split


def load_folder_models(
    folder: Path, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, float]]:
    """The diffusers models (UNet, VAE, transformer) of a diffusers folder, read the fast way.

    For ``from_pretrained(folder, **models)``, which loads the rest (text encoders, tokenizers,
    scheduler) itself. Left to it as well: a component without ``diffusion_pytorch_model.safetensors``
    (or its shard index), a quantised one, one with modules kept in float32 when loading in half
    precision, and any whose weights do not fit its config (such as old attention key names).
    """
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    staging = Staging(device, READ_THREADS) if device.type == "cuda" else None
    models: dict[str, Any] = {}
    split = {"gigabytes": 0.0, "read": 0.0, "build": 0.0}
    for name, spec in index.items():
        cls = (
            getattr(diffusers, spec[1] or "", None)
            if isinstance(spec, list) and spec[0] == "diffusers"
            else None
        )
        files = _weight_files(folder / name)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) and files):
            continue
        config = cls.load_config(folder / name)
        if "quantization_config" in config or (cls._keep_in_fp32_modules and dtype != torch.float32):
            continue
        started = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            specs = tensor_table(file)
            split["gigabytes"] += sum(s.nbytes for s in specs) / 1e9
            tensors |= read_tensors(file, specs, device, dtype, staging=staging)
        built = time.perf_counter()
        with _empty_weights():
            model = cls.from_config(config)
        try:
            _assign(model, tensors, device, dtype, name)
        except FastLoadUnsupported:
            continue
        models[name] = model
        split["read"] += built - started
        split["build"] += time.perf_counter() - built
    return models, split


def _weight_files(component: Path) -> list[Path]:
    single = component / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    shards = component / "diffusion_pytorch_model.safetensors.index.json"
    if shards.is_file():
        return sorted({component / name for name in json.loads(shards.read_text())["weight_map"].values()})
    return []


def _timed_read(
    path: Path, specs: list[TensorSpec], device: torch.device, dtype: torch.dtype, staging: Staging | None
) -> tuple[dict[str, torch.Tensor], float]:
    """``read_tensors`` and the seconds it took."""
    started = time.perf_counter()
    return read_tensors(path, specs, device, dtype, staging=staging), time.perf_counter() - started


def _build_text_vae(
    index: dict,
    folder: Path,
    family: str,
    tensors: dict,
    device: torch.device,
    dtype: torch.dtype,
    warm: bool,
    inpaint: bool,
) -> dict[str, Any]:
    """The text encoders and the VAE with their weights, the UNet empty (with its config), then the
    warm-up. One thread at a time: accelerate's init_empty_weights patches torch globally, so two
    threads inside it at once could leave the patch in place."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    started = time.perf_counter()
    out: dict[str, Any] = {}
    vae_class = getattr(diffusers, index["vae"][1])
    vae_config = vae_class.load_config(folder / "vae")
    with _empty_weights():
        vae = vae_class.from_config(vae_config)
    _assign(vae, _convert("vae", convert_ldm_vae_checkpoint, tensors, vae_config), device, dtype, "vae")
    out["vae"] = vae
    for name in ("text_encoder", "text_encoder_2"):
        if name not in index:
            continue
        cls = getattr(transformers, index[name][1])
        config = cls.config_class.from_pretrained(folder, subfolder=name, local_files_only=True)
        with _empty_weights(), _no_init_weights():
            model = cls(config)
        # The same converter per slot as diffusers' create_diffusers_clip_model_from_ldm for SD 1.x / SDXL.
        if name == "text_encoder":
            state = _convert(name, convert_ldm_clip_checkpoint, tensors)
        else:
            state = _convert(
                name, convert_open_clip_checkpoint, model, tensors, prefix="conditioner.embedders.1.model."
            )
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        _assign(model, state, device, dtype, name)
        out[name] = model
    unet_class = getattr(diffusers, index["unet"][1])
    config = dict(unet_class.load_config(folder / "unet"))
    if inpaint:
        config["in_channels"] = 9  # what diffusers' num_in_channels=9 does
    with _empty_weights():
        out["_unet"] = (unet_class.from_config(config), config)
    out["_build_seconds"] = time.perf_counter() - started
    warm_started = time.perf_counter()
    if warm:
        _warm(out, family, device, dtype)
    out["_warm_seconds"] = time.perf_counter() - warm_started
    return out


def _convert(what: str, converter: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """diffusers' converter; what it raises on a checkpoint that does not fit the config means fall back."""
    try:
        return converter(*args, **kwargs)
    except (KeyError, ValueError, IndexError, RuntimeError) as exc:
        raise FastLoadUnsupported(f"{what}: {type(exc).__name__}: {str(exc)[:300]}") from None


def _assign(
    model: torch.nn.Module, state: dict[str, torch.Tensor], device: torch.device, dtype, what: str
) -> None:
    """Give ``model`` (built on meta) the tensors of ``state`` as its own, without copying them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise FastLoadUnsupported(
            f"{what}: the checkpoint lacks {len(missing)} weight(s), e.g. {missing[:3]}"
        )
    wanted: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key in expected:  # keys the model does not have are dropped, as diffusers drops them
        tensor = state[key].contiguous()
        if tensor.data_ptr() in seen and tensor.numel():
            tensor = tensor.clone()  # never two parameters on one storage: LoRA fusing writes in place
        seen.add(tensor.data_ptr())
        wanted[key] = tensor
    try:
        model.load_state_dict(wanted, strict=True, assign=True)
    except RuntimeError as exc:  # shapes that do not fit the config
        raise FastLoadUnsupported(f"{what}: {str(exc).splitlines()[0][:300]}") from None
    # Buffers outside the state dict were built on the CPU in float32. torch's own ``to`` (diffusers'
    # warns about fp32 modules, which these classes do not have); a no-op for the assigned tensors.
    torch.nn.Module.to(model, device=device, dtype=dtype)
    model.eval()


def _no_init_weights() -> Any:
    """transformers' switch that skips its weight initialisation (on meta tensors it only costs
    time: 1.2 s of the CLIP encoders' build for SDXL); where this version lacks it, a no-op."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _empty_weights():
    from accelerate import init_empty_weights

    return init_empty_weights()


@torch.inference_mode()
def _warm(components: dict[str, Any], family: str, device: torch.device, dtype: torch.dtype) -> None:
    """One call of each text encoder on a dummy prompt, one small VAE decode and one call of a
    stand-in UNet: the first real image then finds the kernels loaded and cuBLAS's and cuDNN's
    choices made."""
    for slot, name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        encoder = components.get(name)
        if encoder is not None:
            ids = tokenizer_for(family, slot)("", padding="max_length", max_length=77, return_tensors="pt")
            encoder(ids.input_ids.to(device), output_hidden_states=True)
    side = NATIVE_SIZE.get(family, 1024) // 8  # latents of the family's native image size
    vae = components["vae"]
    vae.to(decode_dtype(vae, device))  # as the engine will run it: bf16's kernels are not fp16's
    vae.decode(torch.zeros(1, vae.config.latent_channels, side, side, device=device, dtype=vae.dtype))
    unet, config = components["_unet"]
    _warm_unet(type(unet), config, _bytes(unet, dtype), family, side, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_unet(
    unet_class: Any,
    config: dict,
    nbytes: int,
    family: str,
    side: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """A UNet of the same config with uninitialised weights, run once at the family's native size
    for one and two rows (without and with guidance), then dropped: its kernels load and cuDNN and
    cuBLAS settle their plans for these shapes while the real weights are still on their way from
    disk, so the first real image does not pay for them. Skipped where the device has no room for
    a second UNet beside the first."""
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 3 * nbytes:
        return
    with _empty_weights():  # built on the meta device, then given memory in its dtype, never filled
        unet = unet_class.from_config(config)
    unet = unet.to(dtype).to_empty(device=device)
    if device.type == "cuda":  # the layout the engine runs it in there (models/speed.py's default)
        unet.to(memory_format=torch.channels_last)
    for rows in (1, 2):
        args, kwargs = example_unet_inputs(unet, rows, side, family)
        unet(*args, **kwargs)
    del unet


def example_unet_inputs(unet: Any, rows: int, side: int, family: str) -> tuple[tuple, dict[str, Any]]:
    """Random inputs for one call of ``unet`` on ``rows`` latents of ``side``² (its device and dtype):
    the positional (latents, timesteps) and the keyword arguments its config asks for."""
    config, device, dtype = unet.config, unet.device, unet.dtype
    x = torch.randn(rows, config.in_channels, side, side, device=device, dtype=dtype)
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(rows, 77, config.cross_attention_dim, device=device, dtype=dtype)
    }
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and the size/crop (or score) ids
        ids = 5 if family == "sdxl-refiner" else 6
        pooled = config.projection_class_embeddings_input_dim - ids * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, pooled, device=device, dtype=dtype),
            "time_ids": torch.randn(rows, ids, device=device, dtype=dtype),
        }
    if config.time_cond_proj_dim is not None:  # LCM-distilled: the guidance embedding
        kwargs["timestep_cond"] = torch.randn(rows, config.time_cond_proj_dim, device=device, dtype=dtype)
    return (x, torch.full((rows,), 500.0, device=device)), kwargs


def _bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """The size of ``module``'s parameters in ``dtype`` (meta ones included)."""
    return sum(p.numel() for p in module.parameters()) * dtype.itemsize
