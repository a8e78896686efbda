"""Per-job CPU overhead of the engine: 128 one-step jobs of a tiny random model, batches of 32.

Run:  python scripts/engine_overhead_cpu.py [--same-prompt]
The model is tiny, so the time is mostly the engine's own per-job work (encoding prompts, preparing
samples, scheduler objects, decode bookkeeping): what limits one-step throughput (turbo-512-1) on a
GPU too. Each job has its own prompt, as real traffic (and scripts/loadgen.py) has; --same-prompt
gives all one prompt, which the prompt cache serves after the first.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from imagegenx.config import EngineSettings, ModelSettings, Settings
from imagegenx.engine.engine import Engine
from imagegenx.types import JobSpec, SchedulerName


def jobs(first_seed: int, count: int = 128) -> list[JobSpec]:
    same = "--same-prompt" in sys.argv
    return [
        JobSpec(
            "a fox" if same else f"a fox #{first_seed + i}",
            "random:tiny-sd21",
            width=64,
            height=64,
            steps=1,
            guidance_scale=0.0,
            scheduler=SchedulerName.EULER,
            seed=first_seed + i,
        )
        for i in range(count)
    ]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    models = ModelSettings(model_dir=Path(tempfile.mkdtemp()), device="cpu")
    with Engine(Settings(models=models, engine=EngineSettings(max_batch=32))) as engine:
        engine.run(jobs(0, 32))  # load and warm up
        started = time.perf_counter()
        engine.run(jobs(1000))
        seconds = time.perf_counter() - started
    print(f"128 one-step jobs: {seconds:.2f} s, {128 / seconds:.1f} jobs/s")


if __name__ == "__main__":
    main()
