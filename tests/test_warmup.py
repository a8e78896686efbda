"""engine/warmup.py: every padded batch shape of a resolution is built before traffic meets it."""

from __future__ import annotations

from collections import Counter
from collections.abc import KeysView

import pytest
import torch
from pydantic import ValidationError

from conftest import make_settings
from imagegenx.api.app import warm_up_engine
from imagegenx.config import EngineSettings
from imagegenx.engine.engine import Engine
from imagegenx.engine.warmup import batch_sizes, warm_up_sizes
from imagegenx.types import JobSpec, SchedulerName

MODEL = "random:tiny-sd15"


@pytest.fixture
def calls(monkeypatch) -> Counter[tuple[str, int]]:
    """torch.compile replaced by a recorder of what each compiled function is called with: (its
    name, the batch of its first tensor), counted. A shape not seen before is what would compile;
    under CUDA graphs, one seen once is what would still record a graph."""
    seen: Counter[tuple[str, int]] = Counter()

    def compile_recording(fn, **_):
        def run(*args, **kwargs):
            first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            seen[(fn.__name__, first.shape[0])] += 1
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(torch, "compile", compile_recording)
    return seen


@pytest.fixture
def shapes(calls) -> KeysView[tuple[str, int]]:
    return calls.keys()


def _compiled_engine(tmp_path, mode: str = "default", **engine) -> Engine:
    settings = make_settings(tmp_path, max_batch=4, **engine)
    models = settings.models.model_copy(update={"compile": mode, "default_model": MODEL})
    return Engine(settings.model_copy(update={"models": models}))


def _jobs(count: int, cfg: float) -> list[JobSpec]:
    return [
        JobSpec("a fox", MODEL, width=64, height=64, steps=2, guidance_scale=cfg,
                scheduler=SchedulerName.EULER, seed=i)
        for i in range(count)
    ]  # fmt: skip


def test_batch_sizes_reach_every_bucket():
    assert batch_sizes(1) == [1]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(12) == [1, 2, 4, 8, 12]  # 12 runs padded to 16
    assert batch_sizes(0) == [1]
    assert batch_sizes(5, every=True) == [1, 2, 3, 4, 5]  # eager: no padding, every shape its own


def test_batch_sizes_reach_every_regional_bucket_with_and_without_guidance():
    """A regionally compiled UNet's buckets are multiples of 8 rows above 8 (batch_bucket): the sizes
    warmed must reach each of them whether a job is one row or two (guided)."""
    from imagegenx.models.speed import batch_bucket

    for largest in (1, 3, 5, 16, 24, 32):
        sizes = batch_sizes(largest, step=8)
        for rows_per_job in (1, 2):
            needed = {batch_bucket(n * rows_per_job, 8) for n in range(1, largest + 1)}
            warmed = {batch_bucket(n * rows_per_job, 8) for n in sizes}
            assert warmed == needed, (largest, rows_per_job)
    assert batch_sizes(16, step=8) == [1, 2, 4, 8, 12, 16]


def test_an_eager_engine_warms_every_batch_size(tmp_path, shapes):
    """Unpadded batches: each size is a shape of its own for the eager kernels' first calls."""
    settings = make_settings(tmp_path, max_batch=4)
    with Engine(settings) as engine:
        assert warm_up_sizes(engine, MODEL, [(64, 64)]) == 8  # 1, 2, 3, 4 jobs; with and without CFG


def test_after_the_warm_up_traffic_meets_no_new_shape(tmp_path, shapes):
    with _compiled_engine(tmp_path) as engine:
        assert warm_up_sizes(engine, MODEL, [(64, 64)]) == 6  # 1, 2, 4 jobs; with and without CFG
        warmed = set(shapes)
        # UNet rows 1, 2, 4 without guidance and 2, 4, 8 with it; decodes of 1, 2 and 4 images.
        assert {rows for name, rows in warmed if name == "forward"} == {1, 2, 4, 8}
        assert {rows for name, rows in warmed if name == "decode"} == {1, 2, 4}
        for count, cfg in [(3, 7.0), (3, 0.0), (1, 7.0), (4, 5.0), (2, 0.0)]:
            assert all(not isinstance(result, Exception) for result in engine.run(_jobs(count, cfg)))
        assert shapes == warmed


def test_under_cuda_graphs_every_shape_is_called_twice_before_traffic(tmp_path, calls):
    """CUDA graph trees record a function on its second call: a shape the warm-up called once
    (the decoder, once per batch) would record under traffic. Compiled default: once suffices."""
    with _compiled_engine(tmp_path, mode="reduce-overhead") as engine:
        assert warm_up_sizes(engine, MODEL, [(64, 64)]) == 6
    assert {rows for name, rows in calls if name == "decode"} == {1, 2, 4}
    assert min(calls.values()) >= 2
    calls.clear()
    with _compiled_engine(tmp_path) as engine:
        warm_up_sizes(engine, MODEL, [(64, 64)])
    assert calls[("forward", 8)] == 1  # 4 guided jobs, one step


def test_without_the_warm_up_the_first_requests_meet_new_shapes(tmp_path, shapes):
    """The control for the test above: the same traffic builds shapes as it goes."""
    with _compiled_engine(tmp_path) as engine:
        engine.run(_jobs(1, 0.0))
        before = set(shapes)
        engine.run(_jobs(3, 7.0))
        assert shapes - before


def test_the_service_warms_its_configured_sizes_before_it_is_ready(tmp_path, shapes):
    with _compiled_engine(tmp_path, warmup_sizes=["64x64"]) as engine:
        assert warm_up_engine(engine, engine.settings)
        assert ("forward", 8) in shapes and ("decode", 4) in shapes


def test_a_size_the_engine_refuses_is_logged_and_the_service_still_serves(tmp_path, shapes, caplog):
    with _compiled_engine(tmp_path, warmup_sizes=["4096x4096"]) as engine:
        assert warm_up_engine(engine, engine.settings)  # the default model works: ready
    assert "warm-up of random:tiny-sd15 at ['4096x4096'] failed" in caplog.text


def test_warm_up_sizes_must_read_width_x_height():
    assert EngineSettings(warmup_sizes=["1024x768"]).warmup_dims == [(1024, 768)]
    with pytest.raises(ValidationError, match="not WIDTHxHEIGHT"):
        EngineSettings(warmup_sizes=["1024"])
