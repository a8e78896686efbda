"""Every family and every sampler through the engine, on tiny random models."""

import io

import numpy as np
import pytest
from PIL import Image

from imagegenx.engine.engine import Engine, JobFailed
from imagegenx.types import JobSpec, SchedulerName, Task


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _array(image) -> np.ndarray:
    return np.frombuffer(image.rgb, np.uint8).reshape(image.height, image.width, 3).astype(int)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from conftest import make_settings

    with Engine(make_settings(tmp_path_factory.mktemp("families"))) as engine:
        yield engine


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("random:tiny-sd15", {}),
        ("random:tiny-sd21", {}),
        ("random:tiny-sdxl", {}),
        ("random:tiny-sdxl-refiner", {"task": Task.IMG2IMG, "strength": 0.3, "steps": 10}),
        ("random:tiny-sd3", {"scheduler": SchedulerName.EULER}),
        ("random:tiny-flux", {"scheduler": SchedulerName.EULER, "guidance_scale": 3.5}),
    ],
)
def test_family_generates(engine, model, extra):
    if extra.get("task") is Task.IMG2IMG:
        extra = extra | {"init_image": _png()}
    base = dict(model=model, width=64, height=64, steps=4)
    futures = [engine.submit(JobSpec("a cat on a sofa", **(base | extra | {"seed": s}))) for s in (1, 2)]
    first, second = (f.result(timeout=300) for f in futures)
    assert (first.width, first.height) == (64, 64)
    assert first.model_name == model
    assert np.abs(_array(first) - _array(second)).mean() > 0.5  # seeds matter
    assert engine.models.loads[model] == 1


def test_flow_families_refuse_other_samplers(engine):
    job = JobSpec("x", "random:tiny-flux", width=64, height=64, steps=2, scheduler=SchedulerName.DDIM)
    with pytest.raises(JobFailed, match="flow-matching Euler"):
        engine.submit(job).result(timeout=300)


def test_a_refused_flow_job_fails_alone_with_its_reason(engine):
    """Jobs batch by model and size, not by sampler: a DDIM job beside Euler ones fails with the
    reason (not "internal error"), and the others of its batch are made."""
    base = dict(model="random:tiny-flux", width=64, height=64, steps=2, guidance_scale=3.5)
    jobs = [JobSpec("x", **base, scheduler=SchedulerName.EULER, seed=s) for s in (1, 2)]
    jobs.insert(1, JobSpec("x", **base, scheduler=SchedulerName.DDIM))
    first, refused, last = engine.run(jobs)
    assert isinstance(refused, JobFailed) and str(refused).startswith("flux models sample with their own")
    assert first.width == last.width == 64


def test_every_sampler_runs_and_differs(engine):
    outputs = {}
    for name in SchedulerName:
        guidance = 1.0 if name is SchedulerName.LCM else 6.0
        job = JobSpec(
            "a lighthouse",
            "random:tiny-sdxl",
            width=64,
            height=64,
            steps=5,
            seed=3,
            scheduler=name,
            guidance_scale=guidance,
        )
        outputs[name] = _array(engine.submit(job).result(timeout=300))
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.array_equal(outputs[a], outputs[b]), (a, b)
