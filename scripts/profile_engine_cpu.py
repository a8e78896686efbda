"""The engine's per-image CPU overhead: 256 one-step jobs of a tiny random SD 2.1 model, batches of 32.

Run:  python scripts/profile_engine_cpu.py            (images/s: ours and plain diffusers, 3 runs)
      python scripts/profile_engine_cpu.py --profile  (cProfile of the engine, top entries)

The model is tiny, so nearly all the time is Python and small-tensor work around the UNet and VAE
calls: the overhead that keeps a GPU idle between kernels in turbo-512-1. The diffusers peer makes
the same images (one pipeline call per 32 prompts) on the same components, as the lower bound.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

import torch

from imagegenx.config import EngineSettings, ModelSettings, Settings
from imagegenx.engine.engine import Engine
from imagegenx.types import JobSpec, SchedulerName

MODEL, SIDE, BATCH = "random:tiny-sd21", 64, 32


def make_jobs(first_seed: int, count: int) -> list[JobSpec]:
    return [
        JobSpec(
            "a fox in the snow",
            MODEL,
            width=SIDE,
            height=SIDE,
            steps=1,
            guidance_scale=0.0,
            scheduler=SchedulerName.EULER,
            seed=first_seed + i,
        )
        for i in range(count)
    ]


def run_diffusers(engine: Engine, count: int) -> float:
    """Seconds for ``count`` images through diffusers' own pipeline, ``BATCH`` prompts per call."""
    pipe = engine.models.get(MODEL).pipe
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    for first in range(0, count, BATCH):
        pipe(
            prompt=["a fox in the snow"] * BATCH,
            width=SIDE,
            height=SIDE,
            num_inference_steps=1,
            guidance_scale=0.0,
            generator=[torch.Generator("cpu").manual_seed(first + i) for i in range(BATCH)],
            output_type="np",
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile one engine run instead")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    models = ModelSettings(model_dir=Path(tempfile.mkdtemp()), device="cpu")
    with Engine(Settings(models=models, engine=EngineSettings(max_batch=BATCH))) as engine:
        engine.run(make_jobs(0, BATCH))  # load and warm up
        run_diffusers(engine, BATCH)
        if args.profile:
            # The engine works on its own thread: profile each batch there (enable and disable
            # must run on the profiled thread).
            profiler = cProfile.Profile()
            run_batch = engine._run_batch

            def profiled(batch: list[JobSpec]) -> None:
                profiler.enable()
                try:
                    run_batch(batch)
                finally:
                    profiler.disable()

            engine._run_batch = profiled  # type: ignore[method-assign]
            engine.run(make_jobs(1000, args.jobs))
            stats = pstats.Stats(profiler).strip_dirs().sort_stats("tottime")
            stats.print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
            return
        for run in range(args.runs):
            started = time.perf_counter()
            results = engine.run(make_jobs(1000 + run * args.jobs, args.jobs))
            ours = time.perf_counter() - started
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                raise SystemExit(f"{len(failed)} jobs failed: {failed[0]}")
            theirs = run_diffusers(engine, args.jobs)
            print(
                f"run {run + 1}: imagegenx {args.jobs / ours:.1f} images/s, "
                f"diffusers {args.jobs / theirs:.1f} images/s, ratio {theirs / ours:.2f}x"
            )


if __name__ == "__main__":
    main()
