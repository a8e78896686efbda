"""Engine paths that differ on a GPU (CI has none: these run in `scripts/gpu_bench.sh cudatests`)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_settings
from imagegenx.engine.engine import Engine
from imagegenx.types import JobSpec, SchedulerName

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_one_batch_mixes_host_and_device_timesteps(tmp_path):
    """LCM keeps its timesteps on the host, Euler on the device: jobs of both share a UNet batch
    (the batch key has no sampler), so the batch's timesteps come from both places."""
    settings = make_settings(tmp_path)
    settings = settings.model_copy(update={"models": settings.models.model_copy(update={"device": "cuda"})})
    jobs = [
        JobSpec(
            "a fox",
            "random:tiny-sd15",
            width=64,
            height=64,
            steps=2,
            guidance_scale=cfg,
            scheduler=sampler,
            seed=i,
        )
        for i, (sampler, cfg) in enumerate(
            [(SchedulerName.LCM, 1.0), (SchedulerName.EULER, 5.0), (SchedulerName.DDIM, 0.0)]
        )
    ]
    with Engine(settings) as engine:
        results = engine.run(jobs)
    assert all(not isinstance(r, Exception) for r in results), results
    assert [r.batch_size for r in results] == [3, 3, 3]  # one batch


def mixed_requests(tmp_path, device: str) -> list:
    """The cold-start scenario's mixed requests, small: one-step LCM jobs in batches over two models,
    with and without LoRAs (three of them), after LoRA switches made outside the engine's batches."""
    from imagegenx.models.cache import ModelCache
    from imagegenx.models.lora_files import write_unet_loras
    from imagegenx.types import LoraRef

    settings = make_settings(tmp_path, max_batch=8)
    settings = settings.model_copy(update={"models": settings.models.model_copy(update={"device": device})})
    loras = ("style-a", "style-b", "style-c")
    pipe = ModelCache(settings.models).get("random:tiny-sdxl").pipe
    write_unet_loras(tmp_path / "loras", pipe.components, loras, rank=4)

    def job(seed: int, model: str = "random:tiny-sdxl", steps: int = 1, lora: str | None = None) -> JobSpec:
        return JobSpec(
            "a red fox in fresh snow",
            model,
            width=64,
            height=64,
            steps=steps,
            guidance_scale=1.0,
            scheduler=SchedulerName.LCM,
            seed=seed,
            loras=(LoraRef(lora, 0.8),) if lora else (),
        )

    with Engine(settings) as engine:
        results = engine.run([job(0, steps=4, lora=name) for name in loras])
        lora_set = engine.models.get("random:tiny-sdxl").extras["loras"]
        for name in loras:  # as the scenario times a switch alone
            lora_set.activate((LoraRef(name, 0.8),))
        results += engine.run([job(0, model="random:tiny-sd15")])
        mixed = [
            job(i, "random:tiny-sd15") if i % 4 == 0 else job(i, lora=None if i % 4 == 1 else loras[i % 3])
            for i in range(24)
        ]
        return results + engine.run(mixed)


@needs_cuda
def test_cuda_one_step_lcm_batches_over_two_models_and_loras(tmp_path):
    """All 1,000 of these failed on the H200 (2026-11-30, BENCHMARKS.md) and none on a CPU."""
    failed = [r for r in mixed_requests(tmp_path, "cuda") if isinstance(r, Exception)]
    assert not failed, failed


def test_one_step_lcm_batches_over_two_models_and_loras_on_the_cpu(tmp_path):
    """The control for the test above (and the helper's own check in CI): the CPU runs them all."""
    results = mixed_requests(tmp_path, "cpu")
    assert len(results) == 28 and not [r for r in results if isinstance(r, Exception)]
