"""Model residency: each model is loaded once and stays until the least recently used must make room.

Every load is counted (``loads``), so tests and metrics can prove that switching tasks or LoRA sets
never reloads a base model.
"""

from __future__ import annotations

import gc
import threading
from collections import Counter, OrderedDict
from typing import Any

from imagegenx.config import ModelSettings
from imagegenx.models.controlnet import load_controlnet
from imagegenx.models.instantid import load_identity_adapter
from imagegenx.models.loader import LoadedModel, load_model
from imagegenx.models.lora import LoraLibrary, LoraSet
from imagegenx.models.lora_fused import FusedLoraSet
from imagegenx.models.sources import ModelSource, resolve
from imagegenx.models.speed import lora_refusal


class ModelCache:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.loras = LoraLibrary(settings.lora_dir)
        self.loads: Counter[str] = Counter()
        self.load_seconds: Counter[str] = Counter()
        self._resident: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def source(self, ref: str) -> ModelSource:
        """Where ``ref`` comes from: a resident model's own source (every job asks: no disk reads
        for it), else resolved now (a missing file or an unknown name raises ``UserError``)."""
        model = self._resident.get(ref)
        return model.source if model is not None else resolve(ref, self.settings)

    def get(self, ref: str) -> LoadedModel:
        """The resident model for ``ref``, loading it (and evicting the LRU one) if needed."""
        with self._lock:
            model = self._resident.get(ref)
            if model is not None:
                self._resident.move_to_end(ref)
                return model
            while len(self._resident) >= max(1, self.settings.max_resident_models):
                _, evicted = self._resident.popitem(last=False)
                _release(evicted)
            model = load_model(self.source(ref), self.settings)
            model.extras["loras"] = lora_set_for(model, self.loras, self.settings)
            self.loads[ref] += 1
            self.load_seconds[ref] += model.load_seconds
            self._resident[ref] = model
            return model

    def controlnet(self, ref: str, base: LoadedModel) -> Any:
        """The ControlNet ``ref`` for ``base``, loaded on first use and kept (and counted) with it."""
        return self._attached(base, "controlnets", ref, load_controlnet)

    def identity_adapter(self, ref: str, base: LoadedModel) -> Any:
        """InstantID's identity adapter ``ref`` for ``base``, loaded once and kept with it."""
        return self._attached(base, "identity_adapters", ref, load_identity_adapter)

    def _attached(self, base: LoadedModel, kind: str, ref: str, load: Any) -> Any:
        """A part loaded for ``base`` and kept in its extras: evicting the base drops it too."""
        with self._lock:
            parts = base.extras.setdefault(kind, {})
            if ref not in parts:
                parts[ref] = load(ref, base, self.settings)
                self.loads[ref] += 1
            return parts[ref]

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def lora_loads(self) -> dict[str, int]:
        with self._lock:
            return {ref: m.extras["loras"].loads for ref, m in self._resident.items()}


def _release(model: LoadedModel) -> None:
    model.extras.clear()
    model.pipe = None
    gc.collect()
    _empty_device_cache(model)


def _empty_device_cache(model: Any) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def lora_set_for(model: LoadedModel, library: LoraLibrary, settings: ModelSettings) -> LoraSet:
    """How ``model`` applies LoRAs (``ModelSettings.lora_mode``): merged into its weights when asked
    for, or by default when it is compiled (adapter layers would make every switch compile again)."""
    compiled = "compile" in model.speedups
    if settings.lora_mode == "fused" or (settings.lora_mode == "auto" and compiled):
        return FusedLoraSet(model.pipe, library, lora_refusal(model.speedups, merged=True))
    return LoraSet(model.pipe, library, lora_refusal(model.speedups), compiled=compiled)
