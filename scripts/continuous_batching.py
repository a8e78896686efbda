"""What continuous batching buys (``IMAGEGENX_ENGINE__CONTINUOUS_BATCHING``): the same open-loop
stream of jobs through the engine with jobs joining running batches at step boundaries, and without
(a batch keeps the jobs it started with). Prints and writes completed jobs/s and latency (submit to
image) for each.

    python scripts/continuous_batching.py --json out.json                      # CPU, tiny SDXL
    python scripts/continuous_batching.py --model random:sdxl --size 1024 --steps 4 --rate 8 --jobs 400
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from imagegenx.config import Settings
from imagegenx.engine.engine import Engine
from imagegenx.types import JobSpec, SchedulerName


def stream(engine: Engine, args: argparse.Namespace) -> dict:
    """Submit ``args.jobs`` jobs at Poisson times of ``args.rate`` a second (the same times for both
    runs: a fixed seed), then wait for all; the figures of that stream."""
    gaps = random.Random(0)
    jobs = [
        JobSpec(f"a red fox {i}", args.model, width=args.size, height=args.size, steps=args.steps,
                guidance_scale=args.cfg, scheduler=SchedulerName.EULER, seed=i)
        for i in range(args.jobs)
    ]  # fmt: skip
    submitted, done, futures = [], {}, []
    start = due = time.perf_counter()
    for i, job in enumerate(jobs):
        due += gaps.expovariate(args.rate)
        time.sleep(max(0.0, due - time.perf_counter()))
        submitted.append(time.perf_counter())
        future = engine.submit(job)
        future.add_done_callback(lambda _, i=i: done.__setitem__(i, time.perf_counter()))
        futures.append(future)
    sizes = [future.result().batch_size for future in futures]
    while len(done) < len(futures):  # a future's callbacks run just after its result is set
        time.sleep(0.001)
    latencies = sorted(done[i] - sent for i, sent in enumerate(submitted))
    wall = max(done.values()) - start
    return {
        "jobs_per_s": round(args.jobs / wall, 3),
        "latency_mean_s": round(statistics.fmean(latencies), 3),
        "latency_p50_s": round(latencies[len(latencies) // 2], 3),
        "latency_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "mean_batch_size": round(statistics.fmean(sizes), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:tiny-sdxl")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=0.0)
    parser.add_argument("--rate", type=float, default=20.0, help="jobs offered a second")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {"args": vars(args) | {"json": None}}
    for continuous in (True, False):
        settings = Settings()
        engine_settings = settings.engine.model_copy(
            update={
                "continuous_batching": continuous,
                "min_size": min(args.size, 256),
                "step_previews": False,
            }
        )
        with Engine(settings.model_copy(update={"engine": engine_settings})) as engine:
            # the model loaded before the clock starts
            engine.run([JobSpec("warm", args.model, width=args.size, height=args.size, steps=1, seed=0)])
            figures = stream(engine, args)
        report["on" if continuous else "off"] = figures
        print(f"continuous batching {'on ' if continuous else 'off'}: {figures}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
