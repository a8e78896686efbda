"""Where a portrait's time goes on a GPU, stage by stage: seed 000's job as `bench portrait-100` runs it.

Run on a CUDA machine:  python scripts/profile_portrait_gpu.py OUT_DIR
(the engine's IMAGEGENX_MODELS__* settings from the environment, as the bench takes them). A first
portrait loads the models and compiles; the second runs under torch.profiler (device kernels only:
the host's work is cProfile's, on both threads that do the portrait's work: the caller's, which runs
the stages, QC and the encodes, and the engine's, which runs the batches). Writes
OUT_DIR/profile-portrait-100.txt: each stage's wall time and how much of it the GPU was busy with
kernels, the top kernels by device time, and the two threads' top Python functions. A stage whose
GPU sits idle much of its wall time is waiting on the host there. Without a GPU it profiles the
bench's smoke portrait (8 tiny drafts) on the CPU, with no device time: a dry run of the script.
"""

from __future__ import annotations

import cProfile
import itertools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from imagegenx.bench.busy import busy_within, kernel_spans
from imagegenx.bench.hostprofile import engine_thread_profiled, stats_text
from imagegenx.bench.portrait import portrait_workload
from imagegenx.bench.scenarios import BENCH_BATCH_LIMITS
from imagegenx.config import Settings
from imagegenx.engine.engine import Engine
from imagegenx.engine.portrait import STAGES, run_portrait


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = Settings()
    settings = env.model_copy(update={"engine": env.engine.model_copy(update=BENCH_BATCH_LIMITS)})
    gpu = torch.cuda.is_available()
    selfies, spec = portrait_workload(smoke=not gpu)
    activity = ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU
    drain = torch.cuda.synchronize if gpu else (lambda: None)
    starts: dict[str, int] = {}  # each stage's first progress call, wall clock in ns

    def progress(stage: str, done: int, total: int) -> None:
        starts.setdefault(stage, time.time_ns())

    with Engine(settings) as engine:
        began = time.perf_counter()
        run_portrait(engine, selfies, spec)  # loads and compiles
        first = time.perf_counter() - began
        drain()
        caller = cProfile.Profile()
        with profile(activities=[activity]) as prof, engine_thread_profiled(engine) as worker:
            caller.enable()
            began = time.perf_counter()
            result = run_portrait(engine, selfies, spec, progress)
            drain()
            wall = time.perf_counter() - began
            caller.disable()
            ended = time.time_ns()
    # Kernel times are microseconds from the trace's start, which is wall-clock nanoseconds.
    trace_start_ns = prof.profiler.kineto_results.trace_start_ns()
    spans = kernel_spans(prof.events())
    timings = result.report["timings_s"]
    marks = [(stage, starts[stage]) for stage in STAGES if stage in starts] + [("end", ended)]
    lines = [
        f"portrait-100{'' if gpu else ' (smoke, CPU)'}: {wall:.2f} s (the first portrait, loads and "
        f"compiles, {first:.1f} s); GPU busy "
        f"{busy_within(spans) / 1e6:.2f} s. Stages (wall from the report; busy within each stage's span, "
        "from its first progress call to the next stage's):",
    ]
    if spans:  # the clocks' agreement, visible: kernels should fall inside the portrait's marks
        first_kernel = (trace_start_ns + spans[0][0] * 1e3 - marks[0][1]) / 1e9
        last_kernel = (trace_start_ns + spans[-1][1] * 1e3 - ended) / 1e9
        lines.append(
            f"  (kernels from {first_kernel:+.3f} s after the first mark to {last_kernel:+.3f} s after "
            "the end mark: both near 0 or inside means the spans below are aligned)"
        )
    elif gpu:
        lines.append("  (no kernel events came back: the busy shares below are empty)")
    for (stage, start), (_, stop) in itertools.pairwise(marks):
        span = (stop - start) / 1e9
        busy = busy_within(spans, (start - trace_start_ns) / 1e3, (stop - trace_start_ns) / 1e3) / 1e6
        lines.append(
            f"  {stage:8s} wall {timings.get(stage, 0.0):6.2f} s, span {span:6.2f} s, "
            f"GPU busy {busy:6.2f} s ({100 * busy / max(span, 1e-9):3.0f}%)"
        )
    lines += [
        "",
        "Top kernels by device time:" if gpu else "Top operators by CPU time:",
        prof.key_averages().table(
            sort_by="self_device_time_total" if gpu else "self_cpu_time_total",
            row_limit=30,
            max_name_column_width=70,
        ),
        "The caller's thread (stages, QC, encodes), cProfile:",
        stats_text(caller, 30),
        "The engine thread (batches), cProfile:",
        stats_text(worker, 30),
    ]
    (out / "profile-portrait-100.txt").write_text("\n".join(lines))
    print("\n".join(lines[: len(marks) + 2]), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "profiles"))
