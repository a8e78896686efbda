"""ControlNet inside the engine's batched loop.

Each sample carries its own control images and strengths (one per ControlNet of its batch key);
one ControlNet call per model serves the whole UNet batch, and each row's residuals are scaled by
its own sample's strength, so jobs with different control images and strengths share a batch.
This is what diffusers' ControlNet pipelines do for one request (the tests check the same image),
with ``conditioning_scale`` applied per row instead of per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor

from imagegenx.pipelines.sample import decode_input_image
from imagegenx.types import JobSpec


@dataclass
class SampleControl:
    net: Any  # a diffusers ControlNetModel
    image: torch.Tensor  # (1, 3, H, W) in [0, 1], at the job's size
    strength: float
    reads_identity: bool = False  # InstantID's IdentityNet: attends to the identity tokens, not the prompt


def prepare_controls(
    job: JobSpec, nets: list[Any], scale_factor: int, device: torch.device, dtype: torch.dtype
) -> list[SampleControl]:
    """The job's control images, prepared as diffusers' ControlNet pipelines prepare them."""
    processor = VaeImageProcessor(vae_scale_factor=scale_factor, do_convert_rgb=True, do_normalize=False)
    controls = []
    for control, net in zip(job.controls, nets, strict=True):
        pil = decode_input_image(control.image, f"the control image for {control.model}")
        image = processor.preprocess(pil, height=job.height, width=job.width).to(device, dtype)
        reads_identity = job.identity is not None and job.identity.identitynet == control.model
        controls.append(SampleControl(net, image, control.strength, reads_identity))
    return controls


def control_residuals(
    rows: list[list[SampleControl]],
    x: torch.Tensor,
    t: torch.Tensor,
    hidden: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
    identity_tokens: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Residuals for the UNet's down and mid blocks, summed over the ControlNets; ``rows[i]`` holds
    row i's controls (a padding row repeats a real one with strength 0). IdentityNet attends to
    ``identity_tokens`` instead of the prompt, as InstantID's pipeline feeds it."""
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for k in range(len(rows[0])):
        net = rows[0][k].net
        image = torch.cat([row[k].image for row in rows])
        strength = torch.tensor([row[k].strength for row in rows], device=x.device, dtype=x.dtype)
        strength = strength.view(-1, 1, 1, 1)
        kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}
        states = identity_tokens if rows[0][k].reads_identity and identity_tokens is not None else hidden
        d, m = net(x, t, encoder_hidden_states=states, controlnet_cond=image, return_dict=False, **kwargs)
        d = [residual * strength for residual in d]
        m = m * strength
        down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
        mid = m if mid is None else mid + m
    assert down is not None and mid is not None
    return down, mid
