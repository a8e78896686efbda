"""Comparing two loaded pipelines' weights, tensor by tensor (the loaders' tests)."""

from __future__ import annotations

import torch

WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")


def assert_same_weights(want, got, *, at_least: int = 100) -> int:
    """Every weighted component of ``got`` holds bit-identical tensors (same dtype and shape) under
    the same names as ``want``'s; returns how many tensors were compared (at least ``at_least``)."""
    compared = 0
    for name in WEIGHTED:
        if getattr(want, name, None) is None:
            assert getattr(got, name, None) is None, name
            continue
        a, b = getattr(want, name).state_dict(), getattr(got, name).state_dict()
        assert a.keys() == b.keys(), name
        differ = [
            k
            for k in a
            if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])
        ]
        assert not differ, f"{name}: {len(differ)} tensor(s) differ, e.g. {differ[:3]}"
        compared += len(a)
    assert compared >= at_least
    return compared
