"""What the model-backed post-processing steps (upscale, face restore) share: where they run, and
how they read their parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def device_and_dtype(
    device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """The step's device (the current CUDA device if any, else the CPU) and dtype (fp16 on CUDA)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev, dtype or (torch.float16 if dev.type == "cuda" else torch.float32)


def param(params: Any, key: str, default: Any) -> Any:
    """``params[key]`` from a mapping or an object's attribute, ``default`` when absent."""
    if params is None:
        return default
    if isinstance(params, Mapping):
        return params.get(key, default)
    return getattr(params, key, default)
