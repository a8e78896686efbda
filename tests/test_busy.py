"""GPU busy time from kernel spans: overlap merged, windows clipped (the portrait profile's stages)."""

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from imagegenx.bench.busy import busy_within, kernel_spans, merge


def test_overlapping_kernels_count_once_and_windows_clip():
    spans = merge([(0, 10), (5, 12), (20, 30), (30, 31)])
    assert spans == [(0, 12), (20, 31)]
    assert busy_within(spans) == 23
    assert busy_within(spans, 10, 25) == 2 + 5
    assert busy_within(spans, 40, 50) == 0


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 30)), max_size=30), st.integers(0, 130))
def test_busy_time_is_the_measure_of_the_union(raw, cut):
    spans = [(s, s + length) for s, length in raw]
    merged = merge(spans)
    covered = {t for s, e in spans for t in range(s, e)}  # unit cells of the union
    assert busy_within(merged) == len(covered)
    assert busy_within(merged, 0, cut) + busy_within(merged, cut) == len(covered)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(merged))  # disjoint, with gaps between


def test_kernel_spans_keep_only_device_kernels():
    """A CPU-only profile has operators and no kernels: nothing is counted as device time."""
    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        x @ x
    assert any(e.name == "aten::mm" for e in prof.events())
    assert kernel_spans(prof.events()) == []
