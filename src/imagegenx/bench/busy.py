"""How long a GPU was busy with kernels, from torch.profiler's events: the whole run, or a window.

Kernels on several streams overlap; their spans are merged before they are summed. A GPU busy well
under 100% of a window's wall time waited for the host there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Span = tuple[float, float]  # start, end


def kernel_spans(events: Iterable[Any]) -> list[Span]:
    """The device kernels' (start, end) of profiler events (FunctionEvents), in microseconds from
    the trace's start, merged where they overlap and sorted."""
    import torch  # the caller profiled with it; nothing here runs at import

    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    return merge(spans)


def merge(spans: Iterable[Span]) -> list[Span]:
    """Overlapping or touching spans joined into one; the result sorted and disjoint."""
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def busy_within(spans: Sequence[Span], start: float = float("-inf"), end: float = float("inf")) -> float:
    """The time of merged ``spans`` inside [start, end), in their unit."""
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in spans)
