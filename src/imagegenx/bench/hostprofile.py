"""Where the engine thread's host time goes: cProfile of its batches, as text.

The GPU profile (torch.profiler) sees CUDA calls and torch operators; the Python around them (the
scheduler, prompt handling, results) shows only as time the GPU sits idle. This names it.
"""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from imagegenx.engine.engine import Engine
from imagegenx.types import JobSpec


@contextmanager
def engine_thread_profiled(engine: Engine) -> Iterator[cProfile.Profile]:
    """The engine thread's batches under cProfile while the block runs (cProfile must be enabled on
    the thread it profiles, so it wraps each batch)."""
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
        yield profiler
    finally:
        engine._run_batch = run_batch  # type: ignore[method-assign]


def stats_text(profiler: cProfile.Profile, top: int = 25) -> str:
    """The top entries by own time and by cumulative time."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def profile_engine_thread(engine: Engine, jobs: Sequence[JobSpec], top: int = 25) -> str:
    """Run ``jobs`` with the engine thread's batches under cProfile; the top entries by own time and
    by cumulative time."""
    with engine_thread_profiled(engine) as profiler:
        engine.run(list(jobs))
    return stats_text(profiler, top)
