"""LoRAs merged into the base weights: hot-swapped in place, so a compiled model is never recompiled.

``LoraSet`` (lora.py) keeps LoRAs as PEFT adapter layers. That costs every step a small matmul pair
per targeted layer, and under ``torch.compile`` every new set or weight changes what Dynamo guards
on, so the UNet compiles again. ``FusedLoraSet`` instead, on each switch:

1. reads each LoRA file once into host memory (the file is never read again);
2. loads the new set's LoRAs as adapters over the current weights (a LoRA that does not fit stops
   here: the adapters go again and the weights still hold the set that was active);
3. puts back the original of every weight an earlier set changed (a copy from the saved originals:
   the base is restored exactly, never by subtracting, which would drift in fp16);
4. saves the original of every weight the new set targets and has not changed before;
5. merges the active adapters at their weights into those weights (peft's merge, in place: the
   tensors keep their storage, so compiled graphs and CUDA graphs' static addresses stay valid);
6. removes the adapter layers: the module tree is again exactly the one that was compiled.

A switch costs an adapter load and a merge (tens to hundreds of milliseconds for an SDXL LoRA on
a GPU) instead of ``set_adapters``' few milliseconds, and the saved originals hold up to one more
copy of each targeted weight on the model's device. Jobs then run at the base model's speed.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file

from imagegenx.models.lora import LoraLibrary, LoraSet
from imagegenx.types import LoraRef

_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class FusedLoraSet(LoraSet):
    """The active LoRA set merged into ``pipe``'s weights; switches restore, then merge the next."""

    def __init__(self, pipe: Any, library: LoraLibrary, refusal: str = "") -> None:
        super().__init__(pipe, library, refusal)
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}  # LoRA name -> its file's tensors
        # id(weight) -> (weight, its original value), for every weight any set has changed.
        self._originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def original_bytes(self) -> int:
        """Device memory held by the saved originals."""
        return sum(saved.numel() * saved.element_size() for _, saved in self._originals.values())

    def _switch(self, loras: tuple[LoraRef, ...]) -> None:
        tensors = {ref.name: self._read(ref.name) for ref in loras}  # 1.
        adapters = self._load_all(loras, tensors)  # 2. UserError here: nothing changed
        self._active = None  # unknown until the merge is done
        try:
            self._restore()  # 3.
            if loras:
                self.pipe.set_adapters(adapters, adapter_weights=[float(ref.weight) for ref in loras])
                self._save_originals()  # 4.
                self.pipe.fuse_lora(adapter_names=adapters, lora_scale=1.0)  # 5.
        finally:
            self.pipe.unload_lora_weights()  # 6.
        self._active = loras

    def _read(self, name: str) -> dict[str, torch.Tensor]:
        if name in self._tensors:
            return self._tensors[name]
        return load_file(self.library.path_for(name))

    def _load_all(self, loras: tuple[LoraRef, ...], tensors: dict[str, dict]) -> list[str]:
        adapters: list[str] = []
        try:
            for ref in loras:
                # A copy of the dict: the loader pops and renames keys of what it is given.
                source = dict(tensors[ref.name])
                adapters.append(self._load_adapter(ref.name, source, taken=set(adapters)))
                if ref.name not in self._tensors:  # kept once it fits: each file is read once
                    self._tensors[ref.name] = tensors[ref.name]
                    self.loads += 1
        except BaseException:
            self.pipe.unload_lora_weights()  # the weights under the adapters were not touched
            raise
        return adapters

    def _restore(self) -> None:
        with torch.no_grad():
            for weight, saved in self._originals.values():
                weight.copy_(saved)

    def _save_originals(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer  # peft comes with LoRA use only

        for component in _COMPONENTS:
            model = getattr(self.pipe, component, None)
            if not isinstance(model, torch.nn.Module):
                continue
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    weight = module.get_base_layer().weight
                    if id(weight) not in self._originals:
                        self._originals[id(weight)] = (weight, weight.detach().clone())
