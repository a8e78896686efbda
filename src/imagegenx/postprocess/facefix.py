"""Face and hand fix, ADetailer style, with the image's own diffusion model.

For every detected face (and hand, when asked) of every image of the batch:

1. mask: the detection box, dilated by ``DILATE`` pixels;
2. crop: the mask's box plus ``PADDING`` pixels of context, made square (clipped to the image);
3. resize the crop and its mask to one inpaint size for the whole batch, so that all crops share
   one batch key and the engine denoises them in one UNet batch;
4. inpaint at low strength (``fix_strength``, default 0.4) with the image's prompt and seed;
5. resize back and paste with the mask feathered by ``FEATHER`` pixels: outside the dilated,
   feathered mask not a pixel changes.

The detections come from the chain's one detection pass; nothing is detected again here.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFilter

from imagegenx.postprocess.encode import to_pil
from imagegenx.types import GeneratedImage, Task
from imagegenx.vision.imagefile import encode_in_process

if TYPE_CHECKING:
    from imagegenx.postprocess.chain import Denoiser, PostprocessSpec

DILATE = 4  # ADetailer's default mask dilation
PADDING = 32  # ADetailer's default "inpaint only masked" padding
FEATHER = 4  # ADetailer's default mask blur
MAX_FIX_SIZE = 1024  # crops are inpainted at the image's own size, at most this


@dataclass(frozen=True)
class Region:
    image: int  # index in the batch
    kind: str  # "face" or "hand"
    mask_box: tuple[int, int, int, int]  # dilated detection box
    crop_box: tuple[int, int, int, int]  # what is cut out and regenerated


def plan_regions(
    sizes: Sequence[tuple[int, int]], detections: Sequence[Sequence[Any]], kinds: Collection[str]
) -> list[Region]:
    """Steps 1-2 for every detection of the wanted kinds."""
    regions = []
    for index, ((width, height), found) in enumerate(zip(sizes, detections, strict=True)):
        for det in found:
            if det.kind not in kinds:
                continue
            left, top, right, bottom = det.box
            mask_box = (
                max(0, left - DILATE),
                max(0, top - DILATE),
                min(width, right + DILATE),
                min(height, bottom + DILATE),
            )
            regions.append(Region(index, det.kind, mask_box, _square_crop(mask_box, width, height)))
    return regions


def _square_crop(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """The box plus padding, grown to a square around its centre and shifted to stay inside the image."""
    left, top, right, bottom = box
    side = min(max(right - left, bottom - top) + 2 * PADDING, width, height)
    cx, cy = (left + right) // 2, (top + bottom) // 2
    x0 = min(max(0, cx - side // 2), width - side)
    y0 = min(max(0, cy - side // 2), height - side)
    return (x0, y0, x0 + side, y0 + side)


def _mask(size: tuple[int, int], region: Region) -> Image.Image:
    """White where the crop is repainted, in full-image coordinates."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(region.mask_box, fill=255)
    return mask


def fix_regions(
    images: Sequence[GeneratedImage],
    detections: Sequence[Sequence[Any]],
    kinds: Collection[str],
    spec: PostprocessSpec,
    denoiser: Denoiser,
) -> list[GeneratedImage]:
    pils = [to_pil(image) for image in images]
    regions = plan_regions([p.size for p in pils], detections, kinds)
    out = [replace(image, post={**image.post, "fixed": []}) for image in images]
    if not regions:
        return out
    # 3. One inpaint size for the batch: the largest image side, a multiple of 8, at most MAX_FIX_SIZE.
    side = min(MAX_FIX_SIZE, max(max(image.job.width, image.job.height) for image in images)) // 8 * 8
    jobs = []
    for n, region in enumerate(regions):
        job = images[region.image].job
        crop = pils[region.image].crop(region.crop_box).resize((side, side), Image.Resampling.LANCZOS)
        mask = _mask(pils[region.image].size, region).crop(region.crop_box).resize((side, side))
        # 4. Inpaint at low strength; the same seed keeps the result reproducible.
        jobs.append(
            replace(
                job,
                task=Task.INPAINT,
                prompt=spec.fix_prompt or job.prompt,
                width=side,
                height=side,
                strength=spec.fix_strength,
                init_image=encode_in_process(crop),
                mask_image=encode_in_process(mask),
                job_id=f"{job.job_id}:fix{n}" if job.job_id else "",
            )
        )
    results = denoiser.run(jobs)
    # 5. Paste back through the feathered mask.
    for region, result in zip(regions, results, strict=True):
        i = region.image
        if isinstance(result, Exception):
            out[i] = replace(out[i], post={**out[i].post, "error": f"{region.kind} fix failed: {result}"})
            continue
        x0, y0, x1, y1 = region.crop_box
        patch = to_pil(result).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
        feathered = _mask(pils[i].size, region).filter(ImageFilter.GaussianBlur(FEATHER))
        layer = pils[i].copy()
        layer.paste(patch, (x0, y0))
        pils[i] = Image.composite(layer, pils[i], feathered)
        out[i].post["fixed"].append(
            {"kind": region.kind, "box": list(region.mask_box), "batch_size": result.batch_size}
        )
    return [
        replace(image, width=pil.width, height=pil.height, rgb=pil.tobytes())
        if image.post["fixed"]
        else image
        for image, pil in zip(out, pils, strict=True)
    ]
