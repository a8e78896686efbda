"""The ``portrait-100`` scenario: seed 000's workload through the engine, end to end.

100 SDXL LCM-4 drafts with InstantID (random parts: adapter, IdentityNet, the random:arcface
stand-in), QC against the selfies, shortlist 15, refine the top 10 (~10 steps), face fix where faces
are found, Real-ESRGAN x4 with strength 0.35 and unsharp, encoding, the report and the contact
sheet. Drafts of random weights are noise, so the face fix finds no real faces (at most what the
detector takes for one in the noise): the row's note says how many it fixed. The models are loaded
by a small portrait first, as in a service that keeps them resident. Smoke mode: 8 tiny drafts, no upscale.
"""

from __future__ import annotations

import io
from dataclasses import replace

from PIL import Image
from skimage import data

from imagegenx.bench.measure import Row, compile_events, describe_events, peak_gib, reset_peak, timed
from imagegenx.engine.engine import Engine
from imagegenx.engine.portrait import PortraitSpec, run_portrait
from imagegenx.models.controlnet import RANDOM_CONTROLNET
from imagegenx.models.instantid import RANDOM_INSTANTID
from imagegenx.vision.selfie import RANDOM_ARCFACE


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def portrait_workload(
    smoke: bool, draft_decoder: str = "full"
) -> tuple[list[tuple[str, bytes]], PortraitSpec]:
    """The selfies and the spec of seed 000's job (smoke: 8 tiny drafts, no upscale)."""
    photo = Image.fromarray(data.astronaut())
    selfies = [("astronaut.png", _png(photo)), ("crop.png", _png(photo.crop((90, 0, 346, 256))))]
    spec = PortraitSpec(
        "a portrait photo of a woman, studio light",
        n=8 if smoke else 100,
        seed=1,
        model="random:tiny-sdxl" if smoke else "random:sdxl",
        upscale=1 if smoke else 4,
        instantid=RANDOM_INSTANTID,
        identitynet=RANDOM_CONTROLNET,
        arcface=RANDOM_ARCFACE,
        draft_decoder=draft_decoder,
    )
    return selfies, spec


def portrait_100(name: str, ctx, engine_settings, draft_decoder: str = "full") -> list[Row]:
    selfies, spec = portrait_workload(ctx.smoke, draft_decoder)
    n = spec.n
    device = ctx.device
    with Engine(engine_settings) as engine:
        # A service keeps its models resident (the cold-start scenario measures loads): a first
        # portrait loads the model, IdentityNet, the adapter and Real-ESRGAN, untimed; small when
        # nothing is compiled, the same one when the batch shapes it meets are compiles.
        small = replace(spec, n=2, shortlist=2, refine_top=1)
        warm = spec if engine_settings.models.compile != "off" else small
        with compile_events() as warm_events:
            first, _ = timed(device, lambda: run_portrait(engine, selfies, warm))
        reset_peak(device)
        with compile_events() as events:
            seconds, result = timed(device, lambda: run_portrait(engine, selfies, spec))
    stages = ", ".join(f"{stage} {s:.2f} s" for stage, s in result.report["timings_s"].items())
    fixed = sum(bool(image.post.get("fixed")) for image in result.finals)
    note = (
        f"{stages}; faces fixed in {fixed} of {len(result.finals)} finals "
        + ("(random drafts have no faces); " if not fixed else "(the detector's finds in noise); ")
        + f"models resident (a first portrait of {warm.n} drafts, loads included, took {first:.1f} s); "
        + describe_events(events, warm_events, engine_settings.models.compile)
    )
    return [Row(name, "imagegenx", n, seconds, [], peak_gib(device), None, note)]
