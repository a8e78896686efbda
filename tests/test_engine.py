"""The engine end to end on tiny random models: batching, seeds, priorities, cancellation, faults."""

import threading
from concurrent.futures import CancelledError
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import make_settings
from imagegenx.engine.engine import Engine, JobFailed
from imagegenx.types import JobSpec, JobStatus, Priority, SchedulerName, Task, UserError

MODEL = "random:tiny-sdxl"


def job(prompt="a red fox in snow", **kw) -> JobSpec:
    base = dict(model=MODEL, width=64, height=64, steps=6, seed=7)
    return JobSpec(prompt, **(base | kw))


def pixels(image) -> np.ndarray:
    return np.frombuffer(image.rgb, np.uint8).reshape(image.height, image.width, 3).astype(int)


def test_generates_images_with_their_own_seeds(settings):
    with Engine(settings) as engine:
        results = [engine.submit(job(seed=s)).result(timeout=120) for s in (1, 2)]
        again = engine.submit(job(seed=1)).result(timeout=120)
    assert (results[0].width, results[0].height) == (64, 64)
    assert np.abs(pixels(results[0]) - pixels(results[1])).mean() > 1  # different seeds differ
    assert np.array_equal(pixels(results[0]), pixels(again))  # same seed, same image
    assert engine.models.loads[MODEL] == 1


def test_batch_composition_does_not_change_an_image(settings):
    """Same seed and parameters: the same image alone or batched with other prompts, guidance
    scales, samplers and a long prompt (padded and masked in cross-attention)."""
    target = job(seed=11)
    neighbours = [
        job("a lighthouse at dusk, " * 30, seed=3, guidance_scale=4.0),  # 3 chunks: longer sequence
        job("a bowl of fruit", seed=5, scheduler=SchedulerName.EULER_A, steps=9),
        job("an owl", seed=9, guidance_scale=1.0),  # no guidance: one UNet row instead of two
    ]
    with Engine(settings) as engine:
        alone = engine.submit(target).result(timeout=120)
        futures = [engine.submit(j) for j in [target, *neighbours]]
        batched = [f.result(timeout=120) for f in futures]
        futures = [engine.submit(j) for j in [target, *neighbours]]
        batched_again = [f.result(timeout=120) for f in futures]
    assert batched[0].batch_size == 4
    assert np.abs(pixels(alone) - pixels(batched[0])).max() <= 2  # float rounding of other GEMM shapes
    for first, second in zip(batched, batched_again, strict=True):
        assert np.array_equal(pixels(first), pixels(second))  # same batch: bit for bit


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_all_tasks_share_one_load(settings):
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))[..., None].repeat(3, 2)
    init, other = _png(ramp), _png(255 - ramp)
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 24:40] = 255
    totals: dict[str, int] = {}
    with Engine(settings) as engine:
        engine.subscribe(lambda e: totals.__setitem__(e.job_id, e.total) if e.total else None)
        engine.submit(job(job_id="t2i")).result(timeout=120)
        i2i = [
            engine.submit(job(job_id=f"i2i{n}", task=Task.IMG2IMG, init_image=img, strength=0.5)).result(
                timeout=120
            )
            for n, img in enumerate((init, other))
        ]
        inpaint = [
            engine.submit(
                job(
                    job_id=f"inp{seed}",
                    seed=seed,
                    task=Task.INPAINT,
                    init_image=init,
                    mask_image=_png(mask),
                    strength=1.0,
                )
            ).result(timeout=120)
            for seed in (1, 2)
        ]
    assert engine.models.loads[MODEL] == 1  # three tasks, one set of loaded components
    assert totals["t2i"] == 6 and totals["i2i0"] == 3  # strength 0.5 runs half the schedule
    assert np.abs(pixels(i2i[0]) - pixels(i2i[1])).mean() > 1  # the input image matters
    # Inpaint: outside the mask the latents are the input's, whatever the seed; inside, the seed decides.
    a, b = pixels(inpaint[0]), pixels(inpaint[1])
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False  # the mask plus a margin for the VAE decoder's receptive field
    assert np.abs(a - b)[outside].mean() < 0.25 * np.abs(a - b)[~outside].mean()


def test_higher_lanes_go_first(tmp_path):
    settings = make_settings(tmp_path, batch_window_ms=200, max_batch=1)
    order: list[str] = []
    with Engine(settings) as engine:
        engine.subscribe(lambda e: order.append(e.job_id) if e.status is JobStatus.SUCCEEDED else None)
        futures = [engine.submit(job(job_id=f"low{i}", priority=Priority.P3)) for i in range(3)]
        futures.append(engine.submit(job(job_id="urgent", priority=Priority.P0)))
        for f in futures:
            f.result(timeout=120)
    assert order.index("urgent") <= 1  # the first batch may have started before it arrived


def test_cancel_mid_batch_leaves_the_others_untouched(settings):
    steps = 12
    jobs = [job(job_id=f"j{i}", seed=i, steps=steps) for i in range(3)]
    with Engine(settings) as engine:
        reference = engine.submit(replace(jobs[0], job_id="ref")).result(timeout=120)
        reached = threading.Event()

        def on_event(event):
            if event.job_id == "j1" and event.status is JobStatus.RUNNING and event.step == 3:
                engine.cancel("j1")
                reached.set()

        seen: list = []
        engine.subscribe(on_event)
        engine.subscribe(lambda e: seen.append(e) if e.job_id == "j1" else None)
        futures = [engine.submit(j) for j in jobs]
        first, third = futures[0].result(timeout=120), futures[2].result(timeout=120)
        with pytest.raises(CancelledError):
            futures[1].result(timeout=120)
    assert reached.is_set()
    steps_run = max(e.step for e in seen if e.status is JobStatus.RUNNING)
    assert steps_run < steps  # stopped at a step boundary, not run to the end
    assert seen[-1].status is JobStatus.CANCELED
    assert np.abs(pixels(first) - pixels(reference)).max() <= 2
    assert third.job.seed == 2


def test_a_queued_job_cancelled_never_runs(tmp_path):
    settings = make_settings(tmp_path, batch_window_ms=300)
    with Engine(settings) as engine:
        events = []
        engine.subscribe(events.append)
        future = engine.submit(job(job_id="gone"))
        assert engine.cancel("gone")
        with pytest.raises(CancelledError):
            future.result(timeout=30)
        kept = engine.submit(job(job_id="kept")).result(timeout=120)
    assert kept.job.job_id == "kept"
    assert not [e for e in events if e.job_id == "gone" and e.status is JobStatus.RUNNING]
    assert not engine.cancel("gone")


def test_out_of_memory_splits_the_batch(tmp_path):
    jobs = [job(job_id=f"o{i}", seed=i) for i in range(4)]
    # A long batching window: the four jobs form one batch even on a machine busy with other work.
    with Engine(make_settings(tmp_path, batch_window_ms=1000)) as engine:
        alone = engine.submit(replace(jobs[0], job_id="alone")).result(timeout=120)
        runner = engine.models.get(MODEL).extras["runner"]
        calls: list[int] = []

        def fake_oom(rows: int) -> None:  # a device with room for 4 UNet rows (2 guided images)
            calls.append(rows)
            if rows > 4:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        runner.before_unet = fake_oom
        results = [f.result(timeout=120) for f in [engine.submit(j) for j in jobs]]
    assert max(calls) == 8 and all(rows <= 4 for rows in calls[1:])  # one failed try, then halves
    assert engine.metrics.oom_splits._value.get() >= 1
    assert engine.scheduler.max_batch_size(jobs[0].batch_key) == 2
    assert np.abs(pixels(results[0]) - pixels(alone)).max() <= 2


@pytest.mark.parametrize("room", ["two images", "a tile"])
def test_a_decode_out_of_memory_goes_one_image_at_a_time_then_tiled(tmp_path, monkeypatch, room):
    """The decode's fallbacks: a batch whose decode runs out of device memory decodes one image at
    a time; an image that does not fit even alone decodes in tiles (diffusers' tiled decode, here
    in 32-pixel tiles of a 64² image). Every job succeeds, with the images of a roomy device."""
    from diffusers import AutoencoderKL

    from imagegenx.pipelines import decoding

    jobs = [job(job_id=f"d{i}", seed=i, steps=2) for i in range(3)]
    with Engine(make_settings(tmp_path / "roomy", batch_window_ms=1000)) as engine:
        roomy = engine.run(jobs)
    tiles = []
    real_tiled_decode = AutoencoderKL.tiled_decode

    def tiled_decode(self, z, *args, **kwargs):
        tiles.append(z.shape)
        return real_tiled_decode(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "tiled_decode", tiled_decode)
    monkeypatch.setattr(decoding, "TILE_PIXELS", 32)
    limit = 2 * 64 * 64 if room == "two images" else 64 * 64 - 1
    settings = make_settings(tmp_path / room, batch_window_ms=1000, fault_oom_decode_above_pixels=limit)
    with Engine(settings) as engine:
        tight = engine.run(jobs)
    assert all(r.batch_size == 3 for r in tight)  # one batch: only its decode was split
    assert len(tiles) == (0 if room == "two images" else 3)
    other_seed = np.abs(pixels(roomy[0]) - pixels(roomy[1])).mean()  # how far apart unrelated images are
    for a, b in zip(roomy, tight, strict=True):
        difference = np.abs(pixels(a) - pixels(b))
        if room == "two images":
            assert difference.max() <= 2  # the same decode, one image at a time
        else:  # the same image, its tiles' seams blended: far closer than another seed's
            assert difference.mean() < other_seed / 2, (difference.mean(), other_seed)


def test_nan_output_is_reported_not_returned(settings):
    with Engine(settings) as engine:
        engine.submit(job()).result(timeout=120)
        model = engine.models.get(MODEL)
        with torch.no_grad():
            model.pipe.vae.post_quant_conv.weight.fill_(float("nan"))
        with pytest.raises(JobFailed, match="NaN"):
            engine.submit(job(seed=99)).result(timeout=120)


def test_bad_requests_are_refused_with_a_reason(settings):
    with Engine(settings) as engine:
        for bad, reason in [
            (job(width=65), "multiple of 8"),
            (job(width=4096), "outside"),
            (job(steps=0), "steps"),
            (job(task=Task.IMG2IMG), "input image"),
            (job(model="nope-such-model", width=512, height=512), "not found"),
            (job(model="random:no-such-arch", width=512, height=512), "unknown architecture"),
        ]:
            with pytest.raises(UserError, match=reason):
                engine.submit(bad)
        with pytest.raises(JobFailed, match="not a readable image"):
            engine.submit(job(task=Task.IMG2IMG, init_image=b"not an image")).result(timeout=60)


def test_metrics_count_loads_and_images(settings):
    from prometheus_client import generate_latest

    with Engine(settings) as engine:
        for s in range(2):
            engine.submit(job(seed=s)).result(timeout=120)
        text = generate_latest(engine.metrics.registry).decode()
    assert f'imagegenx_model_loads_total{{model="{MODEL}"}} 1.0' in text
    assert f'imagegenx_images_total{{model="{MODEL}",status="succeeded"}} 2.0' in text


def test_close_cancels_jobs_that_never_started(tmp_path):
    engine = Engine(make_settings(tmp_path, batch_window_ms=5000))
    future = engine.submit(job(job_id="late"))
    engine.close()
    with pytest.raises(CancelledError):
        future.result(timeout=10)


def test_overlapped_decode_delivers_every_image_after_the_next_step_is_queued(settings):
    """On a GPU a finished sample's image reaches its job only after the next step is queued (the
    device decodes while the engine thread works). Forced here on the CPU: the same images as without
    it, each job delivered once, after the step that follows its last one; none left behind."""
    jobs = [job(seed=s, steps=steps) for s, steps in [(1, 2), (2, 4), (3, 6), (4, 3)]]
    results = {}
    for overlap in (False, True):
        with Engine(settings) as engine:
            batches = engine._batches
            batches.overlap_decode = overlap
            events: list[tuple[str, str]] = []
            engine.subscribe(
                lambda e, events=events: (
                    e.status is JobStatus.RUNNING and events.append(("progress", e.job_id))
                )
            )
            real_deliver, real_step = batches._deliver, batches._step

            def deliver(job_spec, *args, events=events, real=real_deliver):
                events.append(("image", job_spec.job_id))
                real(job_spec, *args)

            def step(runner, samples, events=events, real=real_step):
                events.append(("step", ""))
                return real(runner, samples)

            batches._deliver, batches._step = deliver, step
            futures = [engine.submit(replace(j, job_id=f"j{i}")) for i, j in enumerate(jobs)]
            results[overlap] = [pixels(f.result(timeout=120)) for f in futures]
        images = [name for kind, name in events if kind == "image"]
        assert sorted(images) == ["j0", "j1", "j2", "j3"]  # each once
        last_step = max(i for i, e in enumerate(events) if e[0] == "step")
        checked = [name for name in images if events.index(("image", name)) < last_step]
        assert checked  # some job finished while others still ran
        for name in checked:  # (one finished at the last step is handed over as the loop ends)
            last_progress = max(i for i, e in enumerate(events) if e == ("progress", name))
            between = events[last_progress : events.index(("image", name))]
            assert (("step", "") in between) is overlap, (name, overlap, between)
    for a, b in zip(results[False], results[True], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("continuous", [True, False])
def test_a_job_arriving_mid_batch_joins_it_only_with_continuous_batching(tmp_path, continuous):
    """A short job submitted while a long one runs: with continuous batching it joins at the next
    step boundary and is done first; off, it waits for the long one's batch to finish."""
    settings = make_settings(tmp_path)
    engine_settings = settings.engine.model_copy(update={"continuous_batching": continuous})
    finished: list[str] = []
    with Engine(settings.model_copy(update={"engine": engine_settings})) as engine:
        engine.run([job()])  # loaded and warm: the long job's steps take their usual time
        started = threading.Event()
        engine.subscribe(lambda e: started.set() if e.job_id == "long" and e.step >= 2 else None)
        long = engine.submit(job(job_id="long", steps=40))
        assert started.wait(timeout=120)
        short = engine.submit(job(job_id="short", steps=2, seed=8))
        for future in (long, short):
            future.add_done_callback(lambda f: finished.append(f.job_id))
        results = {name: f.result(timeout=120) for name, f in (("long", long), ("short", short))}
    if continuous:
        assert finished == ["short", "long"] and results["short"].batch_size == 2
    else:
        assert finished == ["long", "short"] and results["short"].batch_size == 1
