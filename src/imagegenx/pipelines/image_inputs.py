"""The starting latents of the tasks that begin from an image, as diffusers' pipelines make them.

- img2img: the input image's latents, noised to the first of the timesteps ``strength`` keeps;
- inpaint: 4-channel UNets start the same way and blend the kept area back after every step (the
  mask and the image's latents go on the sample for that); 9-channel inpainting UNets take the mask
  and the masked image's latents as extra input channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.image_processor import VaeImageProcessor

from imagegenx.models.speed import parameter_dtype
from imagegenx.pipelines.sample import Sample, decode_input_image
from imagegenx.types import JobSpec, UserError

# The noise of a latent shape from a job's generator, on the device (``SDRunner``'s).
NoiseSource = Callable[[tuple[int, ...], torch.Generator], torch.Tensor]


class ImageInputs:
    """Prepares img2img and inpaint samples for one model's VAE."""

    def __init__(
        self,
        vae: torch.nn.Module,
        image_processor: VaeImageProcessor,
        scale_factor: int,
        nine_channel: bool,
        dtype: torch.dtype,
        noise: NoiseSource,
    ) -> None:
        self.vae, self.image_processor, self.nine_channel = vae, image_processor, nine_channel
        self.device, self.dtype, self.noise = vae.device, dtype, noise
        # As diffusers' inpaint pipelines prepare masks: grayscale, binarized, not normalized.
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=scale_factor,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    def img2img(self, sample: Sample, shape: tuple[int, ...]) -> None:
        """``sample.latents``: the input image's latents noised to the sample's first timestep."""
        image_latents = self._encode_latents(self._load_image(sample.job), sample.generator)
        noise = self.noise(shape, sample.generator)
        sample.latents = sample.scheduler.add_noise(image_latents, noise, sample.timesteps[:1])

    def inpaint(self, sample: Sample, shape: tuple[int, ...]) -> None:
        """``sample``'s latents, mask and image latents (or, for a 9-channel UNet, its masked image's
        latents) as diffusers' inpaint pipelines make them."""
        job, generator, scheduler = sample.job, sample.generator, sample.scheduler
        if job.mask_image is None:
            raise UserError("inpaint needs a mask image (white = repaint, black = keep)")
        image = self._load_image(job)
        mask_pil = decode_input_image(job.mask_image, "the mask image", mode="L")
        mask = self.mask_processor.preprocess(mask_pil, height=job.height, width=job.width)
        full_strength = job.strength >= 1.0
        image_latents = None
        if not self.nine_channel or not full_strength:
            # contiguous, as diffusers' inpaint pipeline makes them: same rounding in the UNet's convolutions
            image_latents = self._encode_latents(image, generator).contiguous()
        noise = self.noise(shape, generator)
        if full_strength:
            sample.latents = noise * scheduler.init_noise_sigma
        else:
            sample.latents = scheduler.add_noise(image_latents, noise, sample.timesteps[:1])
        latent_size = (shape[2], shape[3])
        sample.mask = torch.nn.functional.interpolate(mask, size=latent_size).to(self.device, self.dtype)
        sample.image_latents, sample.noise = image_latents, noise
        if self.nine_channel:
            masked = image * (mask < 0.5)
            sample.masked_image_latents = self._encode_latents(masked, generator)

    def _load_image(self, job: JobSpec) -> torch.Tensor:
        if job.init_image is None:
            raise UserError(f"{job.task} needs an input image")
        pil = decode_input_image(job.init_image, "the input image")
        return self.image_processor.preprocess(pil, height=job.height, width=job.width)

    def _encode_latents(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        image = image.to(self.device, parameter_dtype(self.vae))
        dist = self.vae.encode(image).latent_dist
        latents = dist.sample(generator=generator)
        return (latents * self.vae.config.scaling_factor).to(self.dtype)
