"""AUTOMATIC1111's request bodies and their translation: A1111 fields and options into our tasks.

Also the per-process A1111 options (``sd_model_checkpoint``, ``CLIP_stop_at_last_layers``), the
``Processed.js()`` info of finished images and A1111's infotext parser (``/png-info``). The routes are
in ``routes_a1111``.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import time
from datetime import datetime
from typing import Any

from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field

from imagegenx import __version__
from imagegenx.api.app import AppContext
from imagegenx.api.schemas import MAX_PROMPT_CHARS, GenerateParams, Img2ImgParams, InpaintParams
from imagegenx.api.shaped_errors import invalid, validated
from imagegenx.api.styles import apply_style, resolve_style
from imagegenx.api.task_inputs import build_task_input, input_image_bytes
from imagegenx.engine.service import TaskInput
from imagegenx.pipelines.samplers import parse_sampler
from imagegenx.types import SchedulerName, TaskRecord, UserError
from imagegenx.vision.imagefile import decode_image

MAX_IMAGES = 100  # batch_size * n_iter of one request
_NAMES = {
    "text": "prompt",
    "sampler": "sampler_name",
    "style": "styles",
    "clip_skip": "CLIP_stop_at_last_layers",
    "strength": "denoising_strength",
    "loras": "prompt",
    "model": "sd_model_checkpoint",
}


# Bodies ----------------------------------------------------------------------------------------------


class A1111ErrorBody(BaseModel):
    error: str
    detail: str
    body: str
    errors: str


class Txt2ImgRequest(BaseModel):
    """A1111's txt2img fields that mean something here; every other field is accepted and echoed."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[str] | None = None
    seed: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int | None = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int | None = Field(1, ge=1, le=MAX_IMAGES)
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool | None = True
    save_images: bool | None = False


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    mask: str | None = None
    inpainting_mask_invert: int | None = 0
    denoising_strength: float | None = 0.75
    include_init_images: bool | None = False


class PngInfoRequest(BaseModel):
    image: str = Field(description="The image, base64 (data: URLs accepted)")


# Options ---------------------------------------------------------------------------------------------


def current_options(ctx: AppContext) -> dict[str, Any]:
    """This process's A1111 options, kept on the app context (in memory; lost on restart)."""
    if not ctx.a1111_options:
        ctx.a1111_options |= {
            "sd_model_checkpoint": ctx.settings.models.default_model,
            "CLIP_stop_at_last_layers": 1,
        }
    return ctx.a1111_options


def checkpoint_ref(ctx: AppContext, title: str) -> str:
    """A model reference from an A1111 checkpoint title ("name [hash]"), checked against the registry."""
    from imagegenx.models.sources import resolve

    ref = re.sub(r"\s*\[[0-9a-fA-F]*\]$", "", title.strip())
    if ref != ctx.settings.models.default_model:
        try:
            resolve(ref, ctx.settings.models)
        except UserError as exc:
            raise invalid("sd_model_checkpoint", str(exc)) from None
    return ref


def parse_clip_skip(value: Any) -> int:
    """A1111's ``CLIP_stop_at_last_layers`` (1 = the last layer) as an integer 1-12."""
    try:
        clip_skip = int(value)
    except (TypeError, ValueError):
        clip_skip = 0
    if not 1 <= clip_skip <= 12:
        raise invalid("CLIP_stop_at_last_layers", f"must be an integer 1-12, got {value!r}")
    return clip_skip


# Fields → tasks --------------------------------------------------------------------------------------


_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def split_loras(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """A1111's ``<lora:name:weight>`` tags taken out of the prompt, as LoRA choices."""
    loras = []
    for name, weight in _LORA_TAG.findall(prompt):
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise invalid("prompt", f"<lora:{name}:{weight}>: the weight is not a number") from None
        loras.append({"name": name.strip(), "weight": value})
    text = _LORA_TAG.sub("", prompt)
    text = re.sub(r"\s*,(\s*,)+", ",", text).strip().strip(",").strip()
    return text, loras


def a1111_sampler(name: str, scheduler: str | None) -> SchedulerName:
    """A sampler by A1111 name, with A1111 1.9's separate scheduler (DPM++ 2M's default is Karras)."""
    sampler = parse_sampler(name)
    karras = (scheduler or "automatic").strip().lower() in ("automatic", "karras")
    if sampler is SchedulerName.DPMPP_2M and karras:
        return SchedulerName.DPMPP_2M_KARRAS
    if sampler is SchedulerName.DPMPP_2M_KARRAS and not karras:
        return SchedulerName.DPMPP_2M
    return sampler


def _known_styles(names: list[str] | None) -> list[str]:
    known = []
    for name in names or []:
        try:
            if resolve_style(name) is not None:
                known.append(name)
        except UserError:
            pass  # A1111 skips styles it does not have
    return known


def _decode(ctx: AppContext, value: str, what: str) -> bytes:
    """A1111 images: base64 (data: URLs too) or, where allowed, an http(s) URL."""
    value = value.strip()
    is_url = value.startswith(("http://", "https://"))
    return (
        input_image_bytes(ctx, None, value, what) if is_url else input_image_bytes(ctx, value, None, what)
    ) or b""  # decoded


def task_inputs(ctx: AppContext, body: Txt2ImgRequest) -> list[TaskInput]:
    """The tasks of a txt2img or img2img request, one per image (``batch_size * n_iter``)."""
    options = current_options(ctx)
    overrides = body.override_settings or {}
    model = options["sd_model_checkpoint"]
    if overrides.get("sd_model_checkpoint"):
        model = checkpoint_ref(ctx, str(overrides["sd_model_checkpoint"]))
    clip_skip = options["CLIP_stop_at_last_layers"]
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        clip_skip = parse_clip_skip(overrides["CLIP_stop_at_last_layers"])
    count = (body.batch_size or 1) * (body.n_iter or 1)
    if count > MAX_IMAGES:
        raise invalid("batch_size", f"batch_size * n_iter is {count}; at most {MAX_IMAGES} images a request")
    prompt, loras = split_loras(body.prompt or "")
    negative = body.negative_prompt or ""
    styles = _known_styles(body.styles)
    for style in styles[:-1]:  # the last one is applied by build_task_input, as the task's style
        prompt, negative = apply_style(style, prompt, negative)
    seed = body.seed if body.seed is not None and body.seed >= 0 else random.randrange(2**32)
    values: dict[str, Any] = {
        "text": prompt or "-",  # the real prompt, possibly empty as A1111 allows, is passed below
        "negative_prompt": negative,
        "model": model,
        "width": body.width or 512,
        "height": body.height or 512,
        "steps": body.steps or 50,
        "cfg_scale": 7.0 if body.cfg_scale is None else body.cfg_scale,
        "sampler": a1111_sampler(body.sampler_name or body.sampler_index or "Euler", body.scheduler).value,
        "seed": seed,
        "clip_skip": clip_skip,
        "style": styles[-1] if styles else None,
        "loras": loras,
        "format": "png",
    }
    images: list[dict[str, bytes]] = [{}]
    params: GenerateParams
    task = "text2img"
    if isinstance(body, Img2ImgRequest):
        if not body.init_images:
            raise invalid("init_images", "img2img needs at least one image in init_images")
        values["strength"] = 0.75 if body.denoising_strength is None else body.denoising_strength
        inits = [_decode(ctx, value, "init_images") for value in body.init_images[:MAX_IMAGES]]
        mask = _decode(ctx, body.mask, "mask") if body.mask else None
        if mask is not None and body.inpainting_mask_invert:
            mask = _inverted(mask)
        if mask is None:
            task, params = "img2img", validated(Img2ImgParams, values, _NAMES)
            images = [{"init_image": data} for data in inits]
        else:
            task, params = "inpaint", validated(InpaintParams, values, _NAMES)
            images = [{"init_image": data, "mask_image": mask} for data in inits]
    else:
        params = validated(GenerateParams, values, _NAMES)
    items = []
    for i in range(count):
        item = build_task_input(ctx, params, task, text=prompt, **images[i % len(images)])
        item.params["seed"] = seed + i
        items.append(item)
    return items


def _inverted(mask: bytes) -> bytes:
    buf = io.BytesIO()
    ImageOps.invert(decode_image(mask, "mask", mode="L")).save(buf, "PNG")
    return buf.getvalue()


def generation_info(records: list[TaskRecord], body: Txt2ImgRequest) -> dict[str, Any]:
    """A1111's ``Processed.js()`` for the images made."""
    first = records[0].params if records else {}
    steps = first.get("steps", body.steps)
    task = first.get("task", "text2img")
    created = min((r.created_at for r in records), default=time.time())
    return {
        "prompt": first.get("prompt", body.prompt),
        "all_prompts": [r.params["prompt"] for r in records],
        "negative_prompt": first.get("negative_prompt", body.negative_prompt),
        "all_negative_prompts": [r.params["negative_prompt"] for r in records],
        "seed": first.get("seed", body.seed),
        "all_seeds": [r.params["seed"] for r in records],
        "subseed": -1,
        "all_subseeds": [-1 for _ in records],
        "subseed_strength": 0,
        "width": first.get("width", body.width),
        "height": first.get("height", body.height),
        "sampler_name": SchedulerName(first["scheduler"]).a1111_name if first else body.sampler_name,
        "cfg_scale": first.get("guidance_scale", body.cfg_scale),
        "steps": steps,
        "batch_size": body.batch_size or 1,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": first.get("model"),
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.get("strength") if task != "text2img" else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [r.metadata.get("parameters", "") for r in records],
        "styles": body.styles or [],
        "job_timestamp": datetime.fromtimestamp(created).strftime("%Y%m%d%H%M%S"),
        "clip_skip": first.get("clip_skip", 1),
        "is_using_inpainting_conditioning": False,
        "version": f"imagegenx {__version__}",
    }


# Infotext ------------------------------------------------------------------------------------------


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's ``parse_generation_parameters``: prompt, negative prompt, then "Key: value" settings.

    Values stay strings, as A1111 gives them; ``Size: 512x768`` becomes ``Size-1`` and ``Size-2``.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no settings line: it is part of the prompt
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative)}
    for name, raw in _PARAM.findall(last):
        value = raw.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        size = _IMAGE_SIZE.match(value)
        if size:
            result[f"{name}-1"], result[f"{name}-2"] = size[1], size[2]
        else:
            result[name] = value
    result.setdefault("Clip skip", "1")
    return result
