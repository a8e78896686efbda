"""The engine's per-image CPU overhead on tiny random models, beside plain diffusers.

Run:  python scripts/profile_engine_cpu.py                  (turbo: 256 one-step SD 2.1 jobs, batches of 32)
      python scripts/profile_engine_cpu.py --work lcm4      (64 four-step LCM SDXL jobs, batches of 16)
      python scripts/profile_engine_cpu.py --profile        (cProfile of one engine run, top entries)

The models are tiny, so nearly all the time is Python and small-tensor work around the UNet and VAE
calls: the overhead that keeps a GPU idle between kernels in turbo-512-1 and sdxl-1024-lcm4. The
diffusers peer makes the same images (one pipeline call per batch, a generator per image) on the
same components, as the lower bound.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from imagegenx.bench.hostprofile import profile_engine_thread
from imagegenx.config import EngineSettings, ModelSettings, Settings
from imagegenx.engine.engine import Engine
from imagegenx.pipelines.samplers import make_scheduler
from imagegenx.types import JobSpec, SchedulerName

PROMPT = "a fox in the snow"


@dataclass(frozen=True)
class Work:
    model: str
    steps: int
    cfg: float
    sampler: SchedulerName
    jobs: int
    batch: int
    side: int = 64


WORK = {
    "turbo": Work("random:tiny-sd21", 1, 0.0, SchedulerName.EULER, 256, 32),
    "lcm4": Work("random:tiny-sdxl", 4, 1.0, SchedulerName.LCM, 64, 16),
}


def make_jobs(work: Work, first_seed: int) -> list[JobSpec]:
    return [
        JobSpec(
            PROMPT,
            work.model,
            width=work.side,
            height=work.side,
            steps=work.steps,
            guidance_scale=work.cfg,
            scheduler=work.sampler,
            seed=first_seed + i,
        )
        for i in range(work.jobs)
    ]


def run_diffusers(engine: Engine, work: Work, count: int) -> float:
    """Seconds for ``count`` images through diffusers' own pipeline, one call per batch. A sibling
    pipeline holds the sampler, so the engine's model keeps its own scheduler config."""
    pipe = engine.models.get(work.model).pipe
    components = dict(pipe.components) | {"scheduler": make_scheduler(work.sampler, pipe.scheduler.config)}
    peer = type(pipe)(**components)
    peer.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    for first in range(0, count, work.batch):
        peer(
            prompt=[PROMPT] * work.batch,
            width=work.side,
            height=work.side,
            num_inference_steps=work.steps,
            guidance_scale=work.cfg,
            generator=[torch.Generator("cpu").manual_seed(first + i) for i in range(work.batch)],
            output_type="np",
        )
    return time.perf_counter() - started


class ModelClock:
    """Seconds spent inside the UNet's forward and the VAE's decode, ours and the peer's alike (they
    share the modules): what is left of a run's wall time is the overhead around the model calls."""

    def __init__(self, pipe) -> None:
        self.seconds = 0.0
        for module, name in ((pipe.unet, "forward"), (pipe.vae, "decode")):
            setattr(module, name, self._timed(getattr(module, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", choices=sorted(WORK), default="turbo")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile one engine run instead")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    work = WORK[args.work]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    models = ModelSettings(model_dir=Path(tempfile.mkdtemp()), device="cpu")
    with Engine(Settings(models=models, engine=EngineSettings(max_batch=work.batch))) as engine:
        engine.run(make_jobs(work, 0)[: work.batch])  # load and warm up
        run_diffusers(engine, work, work.batch)
        if args.profile:
            print(profile_engine_thread(engine, make_jobs(work, 1000), args.top))
            return
        # Wall time swings with whatever else the machine runs; the time outside the UNet and VAE
        # calls (the same modules on both sides) is the overhead this script is about.
        clock = ModelClock(engine.models.get(work.model).pipe)
        n = work.jobs
        for run in range(args.runs):
            started, model_before = time.perf_counter(), clock.seconds
            results = engine.run(make_jobs(work, 1000 + run * n))
            ours, ours_model = time.perf_counter() - started, clock.seconds - model_before
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                raise SystemExit(f"{len(failed)} jobs failed: {failed[0]}")
            model_before = clock.seconds
            theirs = run_diffusers(engine, work, n)
            theirs_model = clock.seconds - model_before
            print(
                f"{args.work} run {run + 1}: imagegenx {n / ours:.1f} images/s, "
                f"{1000 * (ours - ours_model) / n:.2f} ms/image outside UNet+VAE; "
                f"diffusers {n / theirs:.1f} images/s, {1000 * (theirs - theirs_model) / n:.2f} ms/image; "
                f"ratio {theirs / ours:.2f}x"
            )


if __name__ == "__main__":
    main()
