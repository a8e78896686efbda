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
    key = (name, json.dumps(dict(base_config), sort_keys=True, default=str))
    prototype = _PROTOTYPES.get(key)
    if prototype is None:
        import diffusers

        class_name, overrides = _SAMPLERS[name]
        prototype = getattr(diffusers, class_name).from_config(base_config, **overrides)
        _PROTOTYPES[key] = prototype
    return copy.deepcopy(prototype)


_PROTOTYPES: dict[tuple[SchedulerName, str], Any] = {}


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
