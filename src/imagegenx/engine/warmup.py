"""Warm every batch shape of a resolution before traffic: with compile on, a new shape is a compile.

A compiled UNet and decoder run on static shapes: the engine pads each batch to the next power of two
of its rows (a regionally compiled UNet: above 8 rows, the next multiple of 8; ``batch_bucket``), so a
resolution has a handful of shapes, and the first batch of each
one compiles it (tens of seconds for an SDXL UNet on an H200; with CUDA graphs, a capture too). A
service that meets them under traffic stalls its queue once per shape, and a benchmark that meets
them while timing measures compiles (turbo-512-1 under CUDA graphs: 5 images/s instead of dozens).
``warm_up_sizes`` runs one batch of each padded size (an eager model: of each size) the engine can
form at each resolution, with and
without classifier-free guidance (a guided job is two UNet rows) and with each decoder the model
has, so every shape is built before the first request. Each job has its own prompt, as traffic
does, so the text encoders also run at the batch's size (a batch's prompts are encoded together).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

from imagegenx.engine.engine import Engine
from imagegenx.models.speed import REGIONAL_BUCKET_STEP
from imagegenx.types import JobSpec, SchedulerName

__all__ = ["batch_sizes", "warm_up_sizes"]

log = logging.getLogger(__name__)


def batch_sizes(largest: int, every: bool = False, step: int = 0) -> list[int]:
    """The batch sizes that reach every padded shape up to ``largest`` jobs: 1, 2, 4, ... and
    ``largest`` itself (padded to its own bucket); ``every``: each size from 1 to ``largest``;
    ``step`` (the UNet's bucket step in rows, ``batch_bucket``): 1, 2, 4 and each multiple of half
    of it, so that guided jobs (two rows each) reach every bucket too."""
    if every:
        return list(range(1, max(1, largest) + 1))
    if step:
        jobs = max(1, step // 2)
        sizes = {size for size in (1, 2, 4) if size < min(jobs, largest)} | set(range(jobs, largest, jobs))
        return sorted(sizes | {max(1, largest)})
    sizes, size = [], 1
    while size < largest:
        sizes.append(size)
        size *= 2
    return [*sizes, max(1, largest)]


def warm_up_sizes(
    engine: Engine,
    model: str,
    sizes: Iterable[tuple[int, int]],
    guidance_scales: Sequence[float] = (0.0, 7.0),
    decoders: Sequence[str] | None = None,
) -> int:
    """Run one 1-step batch of each size at each ``(width, height)``, guidance scale and decoder
    (None: the full VAE and, where the model has one, the tiny decoder); returns the batches run.

    Jobs are submitted together, so the engine's batch window groups them into one batch (a batch
    split by a slow submit still warms the smaller shapes). Raises ``UserError`` for a model or size
    the engine refuses, and ``JobFailed`` when a warm-up image fails."""
    loaded = engine.models.get(model)
    if decoders is None:
        decoders = ["full", "tiny"] if loaded.tiny_decoder is not None else ["full"]
    # An eager model's batches are not padded, and its kernels choose their algorithms on the first
    # call of each shape (cuDNN's plans for the convolutions and for attention): every size, then.
    every = "compile" not in loaded.speedups
    step = REGIONAL_BUCKET_STEP if loaded.speedups.get("compile_regional") else 0
    # CUDA graph trees run a compiled function's first call without a graph and record it on the
    # second: a 1-step batch calls the decoder once, so under CUDA graphs each batch runs twice with
    # 2 steps (the UNet records in the first run, the decoder in the second). Once was not enough:
    # sdxl-1024-30's first timed image recorded a graph (1.27 s against 1.13, tenth GPU run).
    graphs = loaded.speedups.get("compile") == "reduce-overhead"
    runs, steps = (2, 2) if graphs else (1, 1)
    batches = 0
    for width, height in sizes:
        # As large as the engine forms at this size (max_batch, the pixel budget, any OOM shrink).
        largest = engine.scheduler.max_batch_size(
            JobSpec("warm-up", model, width=width, height=height).batch_key
        )
        for cfg in guidance_scales:
            for decoder in decoders:
                for count in batch_sizes(largest, every, step):
                    started = time.monotonic()
                    jobs = [
                        JobSpec(f"warm-up {i}", model, width=width, height=height, steps=steps,
                                guidance_scale=cfg, scheduler=SchedulerName.EULER, seed=i, decoder=decoder)
                        for i in range(count)
                    ]  # fmt: skip
                    for _ in range(runs):
                        for outcome in engine.run(jobs):
                            if isinstance(outcome, Exception):
                                raise outcome
                    batches += 1
                    log.info(
                        "warmed %s %dx%d, %d job(s), cfg %g, %s decoder: %.1f s",
                        model, width, height, count, cfg, decoder, time.monotonic() - started,
                    )  # fmt: skip
    return batches
