"""Engine paths that differ on a GPU (CI has none: these run in `scripts/gpu_bench.sh cudatests`)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_settings
from imagegenx.engine.engine import Engine
from imagegenx.types import JobSpec, SchedulerName

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
