"""A portrait's chain steps over its finals (refine, fix, upscale), each through the engine.

``stage`` runs one step over a list of images with progress; ``chained`` keeps each image's step
timings across calls; ``upscaled`` yields the finals upscaled, in order, two at a time where that
pays (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from imagegenx.postprocess.chain import PostprocessSpec, apply_chain
from imagegenx.types import GeneratedImage

if TYPE_CHECKING:  # the engine module loads torch; the API's nodes import portraits without it
    from imagegenx.engine.engine import Engine

__all__ = ["chained", "plain", "stage", "upscaled"]


def plain(image: GeneratedImage) -> GeneratedImage:
    """The image with a job that has no InstantID: refine and fix passes derive their jobs from it."""
    return replace(image, job=replace(image.job, identity=None, controls=()))


def stage(
    name: str,
    images: list[GeneratedImage],
    spec: PostprocessSpec,
    engine: Engine,
    tell: Callable[[str, int, int], None],
    *,
    on: bool,
) -> list[GeneratedImage]:
    """One chain step over ``images`` (together: the engine batches their passes), with progress."""
    total = len(images) if on else 0
    tell(name, 0, total)
    if total:
        images = chained(images, spec, engine)
    tell(name, total, total)
    return images


def chained(images: list[GeneratedImage], spec: PostprocessSpec, engine: Engine) -> list[GeneratedImage]:
    """``apply_chain`` over ``images``, keeping the step timings of earlier calls (the chain starts
    each call with an empty list)."""
    before = [list(image.post.get("steps", [])) for image in images]
    done = apply_chain(images, spec, denoiser=engine)
    return [
        replace(d, post={**d.post, "steps": b + d.post["steps"]}) for d, b in zip(done, before, strict=True)
    ]


def upscaled(finals: list[GeneratedImage], spec: PostprocessSpec, engine: Engine) -> Iterator[GeneratedImage]:
    """Each final through the upscale step ``spec``, one at a time (one batch of its tiles), in order.

    Two run at once on two threads: the upscaler lets one on the device at a time, so one final's host
    copies (Pillow's, about 0.1 s a 4096² final) overlap the other's tiles. At most two are in flight,
    so a consumer that stops (a cancel, a failure) waits for one more. Not with CUDA graphs: their
    trees are per thread, and new threads would record the upscaler's graphs again, each in a memory
    pool of its own; a graphed upscaler runs on the caller's thread, where its graphs were recorded."""
    if engine.settings.models.upscaler_compile == "reduce-overhead":
        for final in finals:
            yield chained([final], spec, engine)[0]
        return
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="imagegenx-upscale") as upscalers:
        pending = [upscalers.submit(chained, [final], spec, engine) for final in finals[:1]]
        for n in range(len(finals)):
            if n + 1 < len(finals):
                pending.append(upscalers.submit(chained, [finals[n + 1]], spec, engine))
            yield pending[n].result()[0]
