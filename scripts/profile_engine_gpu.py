"""Where the engine's time goes on a GPU: torch.profiler over the bench scenarios' generation work.

Run on a CUDA machine:  python scripts/profile_engine_gpu.py OUT_DIR [SCENARIO ...] (default: the
four batch ones; ``sdxl-1024-30`` and ``flux-dev-1024-28`` when named)
Writes OUT_DIR/profile-<scenario>.txt: wall time, the share of it the GPU was busy with kernels, the
top operations by host (CPU) time and by device time (and by input shapes), a cProfile of the
engine thread over the same work, and every place the host waited for the device (PyTorch's sync
debug mode: a pageable copy, an ``.item()``, a CUDA tensor read as a Python bool). A GPU busy well
under 100% means the engine's Python work between kernels, not the kernels, sets the pace, and each
such wait stops the host from queuing the next batch while the device runs this one.
"""

from __future__ import annotations

import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from imagegenx.bench.busy import busy_within, kernel_spans
from imagegenx.bench.hostprofile import profile_engine_thread
from imagegenx.bench.scenarios import BENCH_BATCH_LIMITS
from imagegenx.config import EngineSettings, Settings
from imagegenx.engine.engine import Engine
from imagegenx.types import JobSpec, SchedulerName

WORK = {  # model, side, steps, CFG, sampler, images, decoder ("tiny": a random TAESD-architecture one)
    "turbo-512-1": ("random:sd21", 512, 1, 0.0, SchedulerName.EULER, 128, "full"),
    "sdxl-1024-lcm4": ("random:sdxl", 1024, 4, 1.0, SchedulerName.LCM, 32, "full"),
    "turbo-512-1-tiny": ("random:sd21", 512, 1, 0.0, SchedulerName.EULER, 128, "tiny"),
    "sdxl-1024-lcm4-tiny": ("random:sdxl", 1024, 4, 1.0, SchedulerName.LCM, 32, "tiny"),
    # one image each: the latency scenarios (Flux: the share of matmuls that fp8 would speed up)
    "sdxl-1024-30": ("random:sdxl", 1024, 30, 7.0, SchedulerName.DPMPP_2M_KARRAS, 1, "full"),
    "flux-dev-1024-28": ("random:flux-dev", 1024, 28, 3.5, SchedulerName.EULER, 1, "full"),
}


def jobs(name: str, first_seed: int) -> list[JobSpec]:
    model, side, steps, cfg, sampler, count, decoder = WORK[name]
    return [
        JobSpec("a red fox in fresh snow", model, width=side, height=side, steps=steps,
                guidance_scale=cfg, scheduler=sampler, seed=first_seed + i, decoder=decoder)
        for i in range(count)
    ]  # fmt: skip


def device_busy_seconds(prof) -> float:
    """Kernel time on the device, merged where kernels overlap (several streams)."""
    return busy_within(kernel_spans(prof.events())) / 1e6  # microseconds


def sync_points(engine: Engine, work: list[JobSpec]) -> str:
    """Each place the host waited for the device while ``engine`` ran ``work``, with its count and
    the innermost frames of ours and diffusers' that asked (sync debug mode warns at each one)."""
    counts: Counter[tuple[str, str]] = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return  # another warning of the same run
        frames = [
            f
            for f in traceback.extract_stack()[:-1]
            if "imagegenx" in f.filename or "diffusers" in f.filename
        ]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-5:]))
        counts[(str(message).split("\n")[0][:90], where)] += 1

    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.run(work)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    lines = [f"{n:6d}  {message}\n        at {where}" for (message, where), n in counts.most_common(30)]
    return "\n".join(lines) or "none"


def main(out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = Settings()  # IMAGEGENX_MODELS__* from the environment: a compiled or fp8 model profiled
    settings = env.model_copy(
        update={
            "engine": EngineSettings(**BENCH_BATCH_LIMITS),
            "models": env.models.model_copy(update={"tiny_decoders": {"sd21": "random", "sdxl": "random"}}),
        }
    )
    with Engine(settings) as engine:
        for name in names or list(WORK)[:4]:
            engine.run(jobs(name, 0)[:32])  # load and warm up
            torch.cuda.synchronize()
            # Shapes name the kernels: which tensor a long elementwise or layout kernel worked on.
            with profile(
                activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True
            ) as prof:
                started = time.perf_counter()
                engine.run(jobs(name, 1000))
                torch.cuda.synchronize()
                wall = time.perf_counter() - started
            busy = device_busy_seconds(prof)
            count = WORK[name][5]
            averages = prof.key_averages()
            text = [
                f"{name}: {count} images in {wall:.3f} s ({count / wall:.1f} images/s); "
                f"GPU busy with kernels {busy:.3f} s = {100 * busy / wall:.0f}% of the wall time",
                "",
                "Top by host time (self CPU):",
                averages.table(sort_by="self_cpu_time_total", row_limit=25),
                "Top by device time:",
                averages.table(sort_by="self_device_time_total", row_limit=25),
                "Top operators by device time, by input shapes:",
                prof.key_averages(group_by_input_shape=True).table(
                    sort_by="device_time_total",
                    row_limit=30,
                    max_name_column_width=40,
                    max_shapes_column_width=90,
                ),
            ]
            # Then the engine thread's Python, which the GPU waits for while it runs.
            text += [
                "Engine thread, cProfile of the same work:",
                profile_engine_thread(engine, jobs(name, 2000)),
            ]
            text += [
                "",
                "Where the host waited for the device (count, operation, innermost frames):",
                sync_points(engine, jobs(name, 3000)),
            ]
            (out / f"profile-{name}.txt").write_text("\n".join(text))
            print(text[0], flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "profiles"), sys.argv[2:])
