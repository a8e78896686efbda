"""Where the engine thread's host time goes: cProfile of its batches, as text.

The GPU profile (torch.profiler) sees CUDA calls and torch operators; the Python around them (the
scheduler, prompt handling, results) shows only as time the GPU sits idle. This names it.
"""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Sequence

from imagegenx.engine.engine import Engine
from imagegenx.types import JobSpec


def profile_engine_thread(engine: Engine, jobs: Sequence[JobSpec], top: int = 25) -> str:
    """Run ``jobs`` with the engine thread's batches under cProfile; the top entries by own time and
    by cumulative time. (cProfile must be enabled on the thread it profiles, so it wraps the batch.)"""
    profiler = cProfile.Profile()
    run_batch = engine._run_batch

    def profiled(batch: list[JobSpec]) -> None:
        profiler.enable()
        try:
            run_batch(batch)
        finally:
            profiler.disable()

    engine._run_batch = profiled  # type: ignore[method-assign]
    try:
        engine.run(list(jobs))
    finally:
        engine._run_batch = run_batch  # type: ignore[method-assign]
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()
