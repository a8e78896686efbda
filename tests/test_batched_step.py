"""Batched scheduler work (``pipelines.batched``) against the per-sample path it replaces.

The batched step runs the same element-wise arithmetic with the same scalars on concatenated
latents, and draws each image's noise from its own generator, so the latents must be equal bit for
bit, not merely close: for Euler, LCM (noise at every step but the last) and DPM++ 2M Karras (a
history of model outputs per image). Through the whole runner, a batch stepped with batching and
the same batch stepped one sample at a time in its scheduler calls give identical latents, and a
sample that joins a running batch still gives its solo result.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_settings
from imagegenx.models.loader import load_model
from imagegenx.models.sources import resolve
from imagegenx.pipelines import batched
from imagegenx.pipelines.batched import make_runs, step_run
from imagegenx.pipelines.samplers import make_timed_scheduler
from imagegenx.pipelines.sd import SDRunner
from imagegenx.types import JobSpec, SchedulerName

MODEL = "random:tiny-sd15"
SAMPLERS = [SchedulerName.EULER, SchedulerName.LCM, SchedulerName.DPMPP_2M_KARRAS, SchedulerName.EULER_A]


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> SDRunner:
    settings = make_settings(tmp_path_factory.mktemp("batched"))
    return SDRunner(load_model(resolve(MODEL, settings.models), settings.models))


def job(seed: int, **kw) -> JobSpec:
    base = dict(model=MODEL, width=64, height=64, steps=4, guidance_scale=1.0, seed=seed)
    return JobSpec(kw.pop("prompt", "a lighthouse"), **(base | kw))


def clone(samples):
    """Independent copies: own latents, generator state and scheduler (with its history lists)."""
    twins = []
    for s in samples:
        twin = copy.copy(s)
        twin.generator = torch.Generator("cpu").set_state(s.generator.get_state())
        twin.scheduler = copy.deepcopy(s.scheduler)
        twin.latents = s.latents.clone()
        twins.append(twin)
    return twins


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batched_scheduler_step_equals_per_sample_steps(runner, sampler):
    samples = runner.prepare([job(seed, scheduler=sampler) for seed in (1, 2, 3, 4, 5)])
    alone = clone(samples)
    predictions = torch.Generator().manual_seed(0)
    while not samples[0].done:
        prediction = torch.randn(len(samples), *samples[0].latents.shape[1:], generator=predictions)
        [run] = make_runs(samples)  # one schedule, one step: a single run
        step_run(run, prediction)
        for i, sample in enumerate(alone):
            runner._scheduler_step(sample, prediction[i : i + 1])
        for batched_sample, solo in zip(samples, alone, strict=True):
            assert batched_sample.index == solo.index
            assert torch.equal(batched_sample.latents, solo.latents)
    # the noise was really drawn per image and used (LCM, Euler a): the images differ
    assert not torch.equal(samples[0].latents, samples[1].latents)


def run_all(runner: SDRunner, samples) -> None:
    while not all(s.done for s in samples):
        runner.step([s for s in samples if not s.done])


@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["nocfg", "cfg5"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_runner_batched_equals_runner_per_sample(runner, sampler, guidance, monkeypatch):
    jobs = [job(seed, scheduler=sampler, guidance_scale=guidance) for seed in (7, 8, 9)]
    jobs.append(job(10, scheduler=SchedulerName.UNIPC, guidance_scale=guidance))  # steps alone
    samples = runner.prepare(jobs)
    assert [len(r.samples) for r in make_runs(samples)] == [3, 1]
    per_sample = clone(samples)
    run_all(runner, samples)
    monkeypatch.setattr(batched, "batch_key", lambda sample: None)  # every sample its own run
    assert len(make_runs(per_sample)) == 4
    run_all(runner, per_sample)
    for a, b in zip(samples, per_sample, strict=True):
        assert torch.equal(a.latents, b.latents)


def test_prepare_draws_each_images_own_noise(runner):
    jobs = [job(seed) for seed in (21, 22, 23)]
    together = runner.prepare(jobs)
    for spec, sample in zip(jobs, together, strict=True):
        [alone] = runner.prepare([spec])
        assert torch.equal(sample.latents, alone.latents)


def join_mid_batch(runner: SDRunner, sampler: SchedulerName, target: JobSpec):
    """Two 6-step samples run two steps; then ``target`` and a twin of its schedule join: they step
    together (one run), beside the first two (another run, two steps ahead)."""
    running = runner.prepare([job(seed, scheduler=sampler, steps=6, guidance_scale=3.0) for seed in (41, 42)])
    runner.step(running)
    runner.step(running)
    joined = runner.prepare([target, job(32, scheduler=sampler, steps=4, guidance_scale=3.0)])
    batch = running + joined
    runs = [len(r.samples) for r in make_runs(batch)]
    run_all(runner, batch)
    return batch, runs


@pytest.mark.parametrize("sampler", [SchedulerName.LCM, SchedulerName.DPMPP_2M_KARRAS])
def test_samples_joining_mid_batch_match_their_solo_result(runner, sampler, monkeypatch):
    target = job(31, scheduler=sampler, steps=4, guidance_scale=3.0)
    [solo] = runner.prepare([target])
    run_all(runner, [solo])
    batch, runs = join_mid_batch(runner, sampler, target)
    assert runs == [2, 2]
    # The UNet's GEMMs round differently for 8 rows than for 2 (the per-sample path does the same):
    # close to the solo latents relative to their size (about 45 with these random weights) ...
    scale = float(solo.latents.abs().max())
    assert float((batch[2].latents - solo.latents).abs().max()) <= 1e-5 * scale
    assert not torch.allclose(batch[3].latents, solo.latents)
    # ... and identical to the same batch with every scheduler call made per sample.
    monkeypatch.setattr(batched, "batch_key", lambda sample: None)
    per_sample, runs = join_mid_batch(runner, sampler, target)
    assert runs == [1, 1, 1, 1]
    for a, b in zip(batch, per_sample, strict=True):
        assert torch.equal(a.latents, b.latents)


def test_timed_schedulers_are_independent_copies():
    from diffusers import DPMSolverMultistepScheduler

    config = DPMSolverMultistepScheduler().config
    a = make_timed_scheduler(SchedulerName.DPMPP_2M_KARRAS, config, 5, "cpu")
    b = make_timed_scheduler(SchedulerName.DPMPP_2M_KARRAS, config, 5, "cpu")
    assert a is not b and a.model_outputs is not b.model_outputs
    a.step(torch.ones(1, 4, 2, 2), a.timesteps[0], torch.ones(1, 4, 2, 2))
    assert b.step_index is None
    assert all(output is None for output in b.model_outputs)
    assert a.step_index == b.begin_index + 1


@pytest.mark.parametrize("sampler", [SchedulerName.LCM, SchedulerName.DDIM])
def test_schedulers_that_index_cpu_tables_keep_their_timesteps_on_the_cpu(sampler):
    """LCM's and DDIM's steps index alphas_cumprod (a CPU table) with the timestep and read the
    previous one as a bool: their timesteps stay on the host whatever the device, so no step waits
    for the GPU (asked for CUDA here, which this CPU-only machine could not give them)."""
    from diffusers import DDIMScheduler

    config = DDIMScheduler().config
    scheduler = make_timed_scheduler(sampler, config, 4, torch.device("cuda"))
    assert scheduler.timesteps.device.type == "cpu"
    if torch.cuda.is_available():  # the others go to the device asked for
        assert make_timed_scheduler(SchedulerName.EULER, config, 4, torch.device("cuda")).timesteps.is_cuda
    else:
        with pytest.raises((RuntimeError, AssertionError), match="CUDA"):
            make_timed_scheduler(SchedulerName.EULER, config, 4, torch.device("cuda"))


def test_a_batchs_prompts_are_encoded_in_one_call_each_once(runner):
    runner.prompts.clear_cache()
    calls = []
    encoders = runner.prompts.text_encoders
    hooks = [encoder.register_forward_hook(lambda *_: calls.append(1)) for encoder in encoders]
    prompts = ["a red fox", "a red fox", "a (blue:1.3) heron", "a lighthouse at dusk, " * 20]
    try:
        samples = runner.prepare([job(seed, prompt=p, guidance_scale=4.0) for seed, p in enumerate(prompts)])
    finally:
        for hook in hooks:
            hook.remove()
    # three distinct prompts and the negative prompt: one call of each text encoder for all of them
    assert len(calls) == len(encoders)
    assert samples[0].cond is samples[1].cond  # an equal prompt is encoded once
    assert samples[3].cond.shape[1] >= 2 * 77  # the long prompt kept its chunks
    runner.prompts.clear_cache()
    for sample, prompt in zip(samples, prompts, strict=True):
        alone = runner.prompts.encode(prompt).hidden  # a batch of one: the rows GEMMs round alike
        assert torch.allclose(sample.cond, alone, rtol=1e-4, atol=1e-5)
