"""LoRAs merged into the base weights: hot-swapped in place, so a compiled model is never recompiled.

``LoraSet`` (lora.py) keeps LoRAs as PEFT adapter layers in the model. That costs every step a small
matmul pair per targeted layer, and under ``torch.compile`` every new set or weight changes what
Dynamo guards on, so the UNet compiles again. ``FusedLoraSet`` keeps the model's modules as they
were compiled and changes only the values of its weights:

1. the first use of a LoRA loads it as PEFT adapters (the file is read once, kohya keys converted),
   keeps those adapter layers, with their low-rank factors on the model's device, and takes them out
   of the model again at once (``unload_lora_weights``): the module tree is the base model's;
2. a switch first puts back the original of every weight an earlier set changed (a copy from the
   saved originals: the base is restored exactly, never by subtracting, which would drift in fp16);
3. then saves the original of each weight the new set targets that was not saved before;
4. and adds each LoRA's delta (peft's own ``get_delta_weight``: B·A times its alpha/rank) times the
   request's weight, in place: the tensors keep their storage, so compiled graphs and CUDA graphs'
   static addresses stay valid;
5. with fused QKV projections (``ModelSettings.fuse_qkv``: the attention reads ``to_qkv``, the
   concatenation of ``to_q``, ``to_k`` and ``to_v``, which stay in the model), copies the changed
   projections into their fused ones, in place as well. LoRA files name the separate projections, so
   this is what lets a fused-QKV model take LoRAs at all.

A switch costs one small matmul and add per targeted layer (a LoRA over the whole SDXL UNet has
about 700), against ``set_adapters``' few milliseconds; jobs then run at the base model's speed. The
saved originals hold up to one more copy of each targeted weight on the model's device.
"""

from __future__ import annotations

from typing import Any

import torch

from imagegenx.models.lora import LoraLibrary, LoraSet
from imagegenx.types import LoraRef, UserError

_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class FusedLoraSet(LoraSet):
    """The active LoRA set merged into ``pipe``'s weights; switches restore, then merge the next."""

    def __init__(self, pipe: Any, library: LoraLibrary, refusal: str = "") -> None:
        super().__init__(pipe, library, refusal)
        self._layers: dict[str, list[Any]] = {}  # LoRA name -> its PEFT layers, out of the model
        # id(weight) -> (weight, its original value), for every weight any set has changed.
        self._originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fused = fused_projections(pipe)

    def original_bytes(self) -> int:
        """Device memory held by the saved originals."""
        return sum(saved.numel() * saved.element_size() for _, saved in self._originals.values())

    def _switch(self, loras: tuple[LoraRef, ...]) -> None:
        for ref in loras:  # 1. UserError here: nothing changed
            self._ensure_loaded(ref.name)
        self._active = None  # unknown until the merge is done
        with torch.no_grad():
            for weight, saved in self._originals.values():  # 2.
                weight.copy_(saved)
            for ref in loras:
                adapter = self._adapters[ref.name]
                for layer in self._layers[ref.name]:
                    weight = layer.get_base_layer().weight
                    if id(weight) not in self._originals:  # 3.
                        self._originals[id(weight)] = (weight, weight.detach().clone())
                    weight.add_(layer.get_delta_weight(adapter), alpha=float(ref.weight))  # 4.
            for fused, parts in self._fused:  # 5.
                if any(id(part.weight) in self._originals for part in parts):
                    fused.weight.copy_(torch.cat([part.weight for part in parts]))
        self._active = loras

    def _ensure_loaded(self, name: str) -> None:
        if name in self._layers:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer  # peft comes with LoRA use only

        try:
            adapter = self._load_adapter(name, str(self.library.path_for(name)))
            layers = [
                module
                for component in _COMPONENTS
                if isinstance(model := getattr(self.pipe, component, None), torch.nn.Module)
                for module in model.modules()
                if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {})
            ]
            if any(layer.use_dora.get(adapter) for layer in layers):
                raise UserError(
                    f"LoRA {name!r} is a DoRA, which merges differently: "
                    "set IMAGEGENX_MODELS__LORA_MODE=adapters"
                )
        finally:
            self.pipe.unload_lora_weights()  # 1. the layers leave the model; this set keeps them
        self._layers[name] = layers
        self._adapters[name] = adapter
        self.loads += 1


# A fused projection and the separate ones it concatenates, as diffusers' ``fuse_projections`` builds
# them (self-attention: q, k, v; cross-attention: k, v, its q stays apart; SD3 and Flux's added ones).
_FUSED_PARTS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def fused_projections(pipe: Any) -> list[tuple[torch.nn.Linear, list[torch.nn.Linear]]]:
    """Every fused projection in ``pipe``'s models, with its parts (none unless QKV was fused)."""
    found = []
    for component in _COMPONENTS:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        for module in model.modules():
            if not getattr(module, "fused_projections", False):
                continue
            for fused, parts in _FUSED_PARTS.items():
                if isinstance(getattr(module, fused, None), torch.nn.Linear):
                    found.append((getattr(module, fused), [getattr(module, part) for part in parts]))
    return found
