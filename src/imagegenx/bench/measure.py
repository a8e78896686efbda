"""Measuring on a device: synchronised clocks, peak memory, FLOPs of the work, the matmul peak."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Row:
    """One measured line of a scenario: one runner (us or a peer) doing the scenario's work."""

    scenario: str
    runner: str  # "imagegenx", "diffusers", "diffusers-fast", or a variant name
    images: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # per request, where the scenario has requests
    peak_vram_gib: float | None = None
    tflop_per_image: float | None = None
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self, peak_tflops: float | None) -> dict[str, Any]:
        data = asdict(self)
        data["images_per_s"] = round(self.images_per_s, 3)
        data["seconds_per_image"] = round(self.seconds / self.images, 4) if self.images else None
        data["p50_s"] = round(percentile(self.latencies, 50), 4) if self.latencies else None
        data["p99_s"] = round(percentile(self.latencies, 99), 4) if self.latencies else None
        achieved = self.tflop_per_image * self.images_per_s if self.tflop_per_image else None
        data["achieved_tflops"] = float(f"{achieved:.4g}") if achieved else None
        data["share_of_peak"] = round(achieved / peak_tflops, 3) if achieved and peak_tflops else None
        data["latencies"] = [round(v, 4) for v in self.latencies]
        data["tflop_per_image"] = float(f"{self.tflop_per_image:.4g}") if self.tflop_per_image else None
        return data


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of few samples is their maximum)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` with the device's queue drained before and after."""
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - started, result


def free_device() -> None:
    """Give the device memory of models just dropped back, before the next runner loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The practical peak: the best of a few square matmuls (8192³ on a GPU, 1024³ on a CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = min(timed(device, lambda: a @ b)[0] for _ in range(5))
    return round(2 * n**3 / best / 1e12, 1)


def count_tflop(fn: Callable[[], Any]) -> float:
    """TFLOP of the matmuls and convolutions ``fn`` runs (PyTorch's FLOP counter).

    Compiled code inside ``fn`` (the blocks of a regionally compiled transformer) runs eagerly here:
    Dynamo meeting the counter's dispatch mode gave up on those blocks for good, and every later step
    ran them eagerly (fp8 Flux: 7.8 s an image in the bench against 3.0 s outside it)."""
    from torch.utils.flop_counter import FlopCounterMode

    with (
        torch.compiler.set_stance("force_eager"),
        torch.inference_mode(),
        FlopCounterMode(display=False) as counter,
    ):
        fn()
    return counter.get_total_flops() / 1e12


@contextlib.contextmanager
def compile_events() -> Iterator[Counter[str]]:
    """What compiled while the block ran: Dynamo's compiles ("compiles") and CUDA-graph recordings
    ("cuda graph recordings"), from torch's compile callbacks. A timed run should have none: any
    there means the figure includes a compile (a batch shape the warm-up missed) or a re-recording."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    names = {CallbackTrigger.DYNAMO: "compiles", CallbackTrigger.CUDAGRAPH_RECORDING: "cuda graph recordings"}
    events: Counter[str] = Counter({name: 0 for name in names.values()})

    def count(args) -> None:
        if args.callback_trigger in names:
            events[names[args.callback_trigger]] += 1

    callback_handler.register_start_callback(count)
    try:
        yield events
    finally:
        callback_handler.remove_start_callback(count)


def describe_events(
    events: Counter[str], warm_up: Counter[str] | None = None, compile_mode: str = "off"
) -> str:
    """``compile_events``' counts for a row's note: "timed run: 0 compiles, 0 cuda graph recordings",
    after the warm-up's counts when the run compiles (``compile_mode``). A compiled run whose warm-up compiled
    nothing ran its model eagerly, and the note says so: the tenth GPU run timed a compiled Flux whose
    blocks Dynamo had silently given up on (BENCHMARKS.md)."""

    def counts(c: Counter[str]) -> str:
        return ", ".join(f"{n} {name}" for name, n in c.items())

    timed = f"timed run: {counts(events)}"
    if warm_up is None or compile_mode == "off":
        return timed
    if not warm_up["compiles"]:
        return f"warm-up compiled nothing, so the model ran eagerly; {timed}"
    return f"warm-up: {counts(warm_up)}; {timed}"
