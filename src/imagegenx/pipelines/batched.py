"""Scheduler work for many samples at once, without changing any sample's numbers.

Every ``Sample`` keeps its own scheduler (so it can join, leave or run alone at any step), but
samples that share a schedule (sampler, scheduler config, step count, start) and stand at the same
step hold identical scheduler state apart from their per-image tensors. For those, one
``scale_model_input`` and one ``step`` over the concatenated latents replace one call per image:
the same element-wise arithmetic with the same scalars, so each image's latents come out bit for
bit as from its own scheduler (``tests/test_batched_step.py`` checks it). Random noise inside a step
comes from the list of the samples' own generators, which ``randn_tensor`` draws one image at a
time, exactly as a solo step draws it.

Only schedulers whose step is element-wise and whose per-image state is known are batched; the
others (UniPC, whose corrector reduces over its history with ``einsum``) and inpaint samples (their
kept-area blend and 9-channel inputs) take the per-sample path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imagegenx.pipelines.sample import Sample
from imagegenx.pipelines.samplers import step_kwargs_supported

# scheduler class name -> attributes that are lists of per-image tensors (the multistep history)
_PER_IMAGE_STATE: dict[str, tuple[str, ...]] = {
    "EulerDiscreteScheduler": (),
    "EulerAncestralDiscreteScheduler": (),
    "LCMScheduler": (),
    "DDIMScheduler": (),
    "DPMSolverMultistepScheduler": ("model_outputs",),
}


@dataclass
class Run:
    """Consecutive samples of one UNet batch that are scaled, guided and stepped together."""

    samples: list[Sample]
    latents: torch.Tensor  # the samples' latents, concatenated (a single sample's own tensor)

    @property
    def lead(self) -> Sample:
        return self.samples[0]

    @property
    def rows(self) -> int:
        return self.lead.rows * len(self.samples)


def batch_key(sample: Sample) -> tuple | None:
    """Samples with equal keys can share one scheduler call; ``None``: this sample steps alone."""
    if sample.schedule is None or sample.mask is not None:
        return None
    if type(sample.scheduler).__name__ not in _PER_IMAGE_STATE:
        return None
    guidance = sample.job.guidance_scale if sample.guided else None
    return (sample.schedule, sample.index, guidance)


def make_runs(samples: list[Sample]) -> list[Run]:
    """Split the batch into maximal runs of consecutive samples with one batch key, keeping the
    order (so the UNet sees its rows in the batch's order, as before)."""
    groups: list[list[Sample]] = []
    previous: tuple | None = None
    for sample in samples:
        key = batch_key(sample)
        if groups and key is not None and key == previous:
            groups[-1].append(sample)
        else:
            groups.append([sample])
        previous = key
    return [Run(g, g[0].latents if len(g) == 1 else torch.cat([s.latents for s in g])) for g in groups]


def scale_inputs(run: Run) -> torch.Tensor:
    """The run's UNet input latents, (len(samples), C, h, w)."""
    lead = run.lead
    return lead.scheduler.scale_model_input(run.latents, lead.timesteps[lead.index])


def guide(run: Run, noise_pred: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance for the run's rows (uncond, cond interleaved per guided sample)."""
    if not run.lead.guided:
        return noise_pred
    uncond, cond = noise_pred[0::2], noise_pred[1::2]
    return uncond + run.lead.job.guidance_scale * (cond - uncond)


def step_run(run: Run, prediction: torch.Tensor) -> None:
    """One scheduler step for every sample of ``run`` (two or more), through the lead's scheduler."""
    lead = run.lead
    scheduler = lead.scheduler
    history = _PER_IMAGE_STATE[type(scheduler).__name__]
    own = {name: getattr(scheduler, name) for name in history}
    for name in history:  # the members' histories, concatenated slot by slot (None: not yet filled)
        slots = zip(*(getattr(s.scheduler, name) for s in run.samples), strict=True)
        setattr(scheduler, name, [None if slot[0] is None else torch.cat(slot) for slot in slots])
    extra: dict = {}
    supported = step_kwargs_supported(type(scheduler))
    if "generator" in supported:
        extra["generator"] = [s.generator for s in run.samples]
    if "eta" in supported:
        extra["eta"] = 0.0
    t = lead.timesteps[lead.index]
    try:
        latents = scheduler.step(prediction, t, run.latents, return_dict=False, **extra)[0]
    except BaseException:  # out of memory, say: the lead keeps its own history for a retry
        scheduler.__dict__.update(own)
        raise
    merged = {name: getattr(scheduler, name) for name in history}
    shared = {k: v for k, v in vars(scheduler).items() if k not in history}
    for i, sample in enumerate(run.samples):
        sample.latents = latents[i : i + 1]
        if sample is not lead:  # the step's bookkeeping (step index, order counters) is the same for all
            state = {k: list(v) if type(v) is list else v for k, v in shared.items()}
            sample.scheduler.__dict__.update(state)
        for name, slots in merged.items():
            setattr(sample.scheduler, name, [None if v is None else v[i : i + 1] for v in slots])
        sample.index += 1
