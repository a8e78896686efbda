"""Sampler names → configured diffusers schedulers, one fresh instance per image.

Each image gets its own scheduler object because multistep samplers (DPM++ 2M, UniPC) keep state
between steps; with one instance per image, images with different samplers and step counts can
share a UNet batch and join or leave it at any step.
"""

from __future__ import annotations

import copy
import inspect
import json
from functools import cache
from typing import Any

from imagegenx.types import SchedulerName, UserError

# name → (diffusers class, config overrides)
_SAMPLERS: dict[SchedulerName, tuple[str, dict[str, Any]]] = {
    SchedulerName.EULER: ("EulerDiscreteScheduler", {}),
    SchedulerName.EULER_A: ("EulerAncestralDiscreteScheduler", {}),
    SchedulerName.DPMPP_2M: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    SchedulerName.DPMPP_2M_KARRAS: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    SchedulerName.DDIM: ("DDIMScheduler", {}),
    SchedulerName.UNIPC: ("UniPCMultistepScheduler", {}),
    SchedulerName.LCM: ("LCMScheduler", {}),
}


def make_scheduler(name: SchedulerName, base_config: dict[str, Any]):
    """A new scheduler of the named kind, keeping the model's training schedule (betas, prediction).

    Building one from its config costs about a millisecond of CPU (config validation, betas); every
    image needs its own, so a prototype per (sampler, config) is built once and copied."""
    key = (name, config_key(base_config))
    prototype = _PROTOTYPES.get(key)
    if prototype is None:
        import diffusers

        class_name, overrides = _SAMPLERS[name]
        prototype = getattr(diffusers, class_name).from_config(base_config, **overrides)
        _PROTOTYPES[key] = prototype
    return copy.deepcopy(prototype)


# Schedulers whose step indexes CPU tables (alphas_cumprod) with the timestep and reads the previous
# timestep as a Python bool: with timesteps on a GPU, each of those is a wait for the device (three
# per LCM step, in the H200 profile's stream syncs); with them on the CPU the step's arithmetic is on
# the same CPU scalars diffusers' own pipelines end up with, and the UNet gets them by a queued copy.
HOST_TIMESTEPS = frozenset({"DDIMScheduler", "LCMScheduler"})


def make_timed_scheduler(name: SchedulerName, base_config: dict[str, Any], steps: int, device: Any) -> Any:
    """``make_scheduler`` then ``set_timesteps(steps, device)``, from a cached prototype.

    ``set_timesteps`` costs another 1.5 ms of numpy and small-tensor work, and a deep copy of a
    scheduler 3 ms (it clones every tensor): together most of the engine's per-image CPU time with
    one-step models. Schedulers never modify their tensors in place after ``set_timesteps`` (they
    rebind attributes), so copies share the prototype's tensors and copy only their lists (the
    multistep histories, which are updated in place). The prototype's step index is fixed here,
    once: it is what the first ``step`` would find by searching ``timesteps`` (a device sync per
    image on a GPU)."""
    key = (name, config_key(base_config), steps, str(device))
    prototype = _TIMED.get(key)
    if prototype is None:
        prototype = make_scheduler(name, base_config)
        on_host = type(prototype).__name__ in HOST_TIMESTEPS
        prototype.set_timesteps(steps, device="cpu" if on_host else device)
        if hasattr(prototype, "index_for_timestep") and hasattr(prototype, "set_begin_index"):
            prototype.set_begin_index(prototype.index_for_timestep(prototype.timesteps[0]))
        if len(_TIMED) >= _MAX_TIMED:  # many models and step counts: start over rather than grow
            _TIMED.clear()
        _TIMED[key] = prototype
    return copy_scheduler(prototype)


def copy_scheduler(scheduler: Any) -> Any:
    """A copy that shares the (never mutated) tensors and copies the lists a step updates in place."""
    twin = object.__new__(type(scheduler))
    twin.__dict__.update({k: list(v) if type(v) is list else v for k, v in vars(scheduler).items()})
    return twin


def config_key(base_config: dict[str, Any]) -> str:
    """A hashable identity for a scheduler config; memoised per config object (they are frozen)."""
    cached = _CONFIG_KEYS.get(id(base_config))
    if cached is not None and cached[0] is base_config:
        return cached[1]
    key = json.dumps(dict(base_config), sort_keys=True, default=str)
    _CONFIG_KEYS[id(base_config)] = (base_config, key)  # holding the config keeps its id unique
    return key


_PROTOTYPES: dict[tuple[SchedulerName, str], Any] = {}
_TIMED: dict[tuple[SchedulerName, str, int, str], Any] = {}
_CONFIG_KEYS: dict[int, tuple[Any, str]] = {}
_MAX_TIMED = 512


def parse_sampler(value: str) -> SchedulerName:
    """Accept our names and A1111's ("DPM++ 2M Karras", "Euler a")."""
    key = value.strip()
    for member in SchedulerName:
        if key.lower() in {member.value, member.a1111_name.lower()}:
            return member
    allowed = ", ".join(m.value for m in SchedulerName)
    raise UserError(f"unknown scheduler {value!r}; choose one of: {allowed}")


@cache
def step_kwargs_supported(scheduler_class: type) -> frozenset[str]:
    """Which optional arguments (generator, eta) this scheduler's ``step`` takes."""
    return frozenset(inspect.signature(scheduler_class.step).parameters) & {"generator", "eta"}


def strength_timesteps(scheduler: Any, steps: int, strength: float) -> Any:
    """Skip the first (1 - strength) of the schedule, as diffusers' img2img ``get_timesteps`` does."""
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0) * scheduler.order
    timesteps = scheduler.timesteps[start:]
    if len(timesteps) == 0:
        raise UserError(f"strength {strength} with {steps} steps leaves no step to run; raise either")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps
