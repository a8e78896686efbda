"""LoRAs by name: a folder of ``.safetensors`` files, and the adapters loaded into one pipeline.

Two ways to apply them (``ModelSettings.lora_mode``): ``LoraSet`` here keeps every LoRA as PEFT
adapters and switches which are active (a switch costs milliseconds; every step pays the adapters'
extra matmuls); ``FusedLoraSet`` (``lora_fused.py``) merges the active set into the base weights
(a switch costs a merge; steps run at the base model's speed; a compiled model is never recompiled).

As adapters, each LoRA file is read into a pipeline at most once (``pipe.load_lora_weights``, which
also converts kohya/A1111 keys); after that a request only switches which adapters are active and at
what weight (``pipe.set_adapters``). The base weights are never touched or reloaded: an empty set
disables every LoRA layer, which then returns exactly its base layer's output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

from imagegenx.models.sources import PICKLE_SUFFIXES, read_safetensors_header, refuse_pickle
from imagegenx.types import LoraRef, UserError

log = logging.getLogger(__name__)

MAX_WEIGHT = 2.0

# kohya/A1111 key prefix -> the pipeline component it targets.
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# Component prefixes of diffusers' own LoRA files (``save_lora_weights``).
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class LoraLibrary:
    """LoRA files in one folder, found by name (file stem)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.safetensors") if p.is_file())

    def path_for(self, name: str) -> Path:
        """The file of LoRA ``name``, or ``UserError`` saying why there is none."""
        if not isinstance(name, str) or not name.strip():
            raise UserError("empty LoRA name")
        if any(ch in name for ch in "/\\\0:") or ".." in name or Path(name).is_absolute():
            raise UserError(
                f"LoRA name {name!r} is not a plain name: give the file stem of a .safetensors file "
                f"in {self.folder}, without folders"
            )
        if Path(name).suffix.lower() in PICKLE_SUFFIXES:
            refuse_pickle(Path(name))
        if name.lower().endswith(".safetensors"):  # one spelling per LoRA, so it loads only once
            raise UserError(f"give the LoRA name without .safetensors: {Path(name).stem!r}")
        path = self.folder / f"{name}.safetensors"
        if path.is_file():
            return path
        for suffix in sorted(PICKLE_SUFFIXES):
            if (self.folder / f"{name}{suffix}").is_file():
                refuse_pickle(self.folder / f"{name}{suffix}")
        known = ", ".join(self.names()) or "none"
        raise UserError(f"LoRA {name!r} not found in {self.folder}; available LoRAs: {known}")

    def describe(self, name: str) -> dict:
        """Format and target components, from the safetensors header only (no weights are read)."""
        path = self.path_for(name)
        return {"name": path.stem, **_classify(path, list(read_safetensors_header(path)))}


def _classify(path: Path, keys: list[str]) -> dict:
    if not keys:
        raise UserError(f"{path.name}: empty safetensors file, not a LoRA")
    kohya = {t for k in keys for p, t in _KOHYA_PREFIXES.items() if k.startswith(p)}
    if kohya:
        return {"format": "kohya", "targets": sorted(kohya)}
    if not any("lora" in k for k in keys):
        raise UserError(f"{path.name}: no LoRA tensors in this file (keys like {keys[0]!r})")
    targets = sorted({k.split(".", 1)[0] for k in keys} & set(_COMPONENTS))
    # PEFT names the two factors lora_A / lora_B (what diffusers writes today); older diffusers
    # files use lora.down / lora.up or lora_linear_layer.
    fmt = "peft" if any(".lora_A." in k or ".lora_B." in k for k in keys) else "diffusers"
    return {"format": fmt, "targets": targets}


def _adapter_name(name: str, taken: set[str]) -> str:
    """A peft adapter name (no dots: adapters live in nn.ModuleDicts) that no other LoRA uses."""
    base = "lora_" + re.sub(r"\W", "_", name, flags=re.ASCII)
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    return candidate


class LoraSet:
    """The adapters loaded into one pipeline; activates a set of (name, weight) per batch."""

    def __init__(self, pipe: Any, library: LoraLibrary, refusal: str = "", *, compiled: bool = False) -> None:
        self.pipe = pipe
        self.library = library
        self.refusal = refusal  # why this model takes no LoRA (speed.lora_refusal), "" if it does
        # torch.compile guards on the adapter layers' names and scales: every new set or weight is
        # compiled again (FusedLoraSet, lora_fused.py, avoids that). Said once per model.
        self.compiled = compiled
        self._warned = False
        self.loads = 0  # LoRA files read into this pipeline, each at most once
        self._adapters: dict[str, str] = {}  # LoRA name -> peft adapter name
        self._active: tuple[LoraRef, ...] | None = ()  # None: unknown after a failed switch

    def active(self) -> tuple[LoraRef, ...]:
        return self._active or ()

    def activate(self, loras: tuple[LoraRef, ...]) -> bool:
        """Make exactly ``loras`` active; True when the set or a weight changed."""
        loras = tuple(loras)
        _validate(loras)
        if loras and self.refusal:
            raise UserError(self.refusal)
        if loras == self._active:
            return False
        self._switch(loras)
        return True

    def _switch(self, loras: tuple[LoraRef, ...]) -> None:
        try:
            for ref in loras:
                self._ensure_loaded(ref.name)
        except UserError:
            # Loading touches the adapter layers (new ones start enabled and active): restore.
            self._apply(self._active or ())
            raise
        self._apply(loras)

    def _apply(self, loras: tuple[LoraRef, ...]) -> None:
        if self.compiled and not self._warned:
            log.warning(
                "LoRAs on a compiled model: each new LoRA set or weight compiles the UNet again "
                "(seconds to minutes, then cached); IMAGEGENX_MODELS__LORA_MODE=fused switches without it"
            )
            self._warned = True
        self._active = None
        if loras:
            self.pipe.enable_lora()  # undo an earlier disable_lora(); set_adapters alone does not
            self.pipe.set_adapters(
                [self._adapters[ref.name] for ref in loras],
                adapter_weights=[float(ref.weight) for ref in loras],
            )
        elif self._adapters:
            self.pipe.disable_lora()
        self._active = loras

    def _ensure_loaded(self, name: str) -> None:
        if name in self._adapters:
            return
        self._adapters[name] = self._load_adapter(name, str(self.library.path_for(name)))
        self.loads += 1

    def _load_adapter(self, name: str, source: str | dict, taken: set[str] | None = None) -> str:
        """Load LoRA ``name`` (its file, or its tensors) as a new PEFT adapter; returns the adapter's
        name, or raises ``UserError`` saying why it does not fit, with nothing of it left behind."""
        if not hasattr(self.pipe, "load_lora_weights"):
            raise UserError(f"{type(self.pipe).__name__} does not support LoRAs")
        info = self.library.describe(name)
        missing = [t for t in info["targets"] if getattr(self.pipe, t, None) is None]
        if not info["targets"] or missing:
            raise UserError(
                f"LoRA {name!r} does not fit this {type(self.pipe).__name__}: it targets "
                f"{', '.join(info['targets']) or 'no known component'}"
                + (f"; the model has no {', '.join(missing)}" if missing else "")
            )
        adapter = _adapter_name(name, set(self._adapters.values()) if taken is None else taken)
        try:
            with warnings.catch_warnings():  # several adapters per model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                # use_safetensors=True: never fall back to unpickling a .bin next to it.
                self.pipe.load_lora_weights(source, adapter_name=adapter, use_safetensors=True)
        except (ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
            self._forget(adapter)
            raise UserError(
                f"LoRA {name!r} does not fit this model (made for another base model?): {_one_line(exc)}"
            ) from None
        if not any(adapter in names for names in self.pipe.get_list_adapters().values()):
            raise UserError(f"LoRA {name!r} matched no layer of this model (made for another family?)")
        return adapter

    def _forget(self, adapter: str) -> None:
        """Remove what a failed load may have left behind (say, the UNet half of a LoRA)."""
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.pipe.delete_adapters([adapter])


def _one_line(exc: Exception, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    text = " ".join(lines[:2]) + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate(loras: tuple[LoraRef, ...]) -> None:
    seen: set[str] = set()
    for ref in loras:
        if not isinstance(ref, LoraRef):
            raise UserError(f"not a LoRA reference: {ref!r}")
        weight = ref.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise UserError(f"LoRA {ref.name!r}: weight must be a number, got {weight!r}")
        if not 0 <= weight <= MAX_WEIGHT:
            raise UserError(f"LoRA {ref.name!r}: weight {weight:g} is outside 0..{MAX_WEIGHT:g}")
        if ref.name in seen:
            raise UserError(f"LoRA {ref.name!r} is given twice; give each LoRA once with one weight")
        seen.add(ref.name)
