"""The AUTOMATIC1111 web UI API (``/sdapi/v1/*``) on the task service, for existing A1111 clients.

Same API keys as the rest (``Authorization: Bearer`` or ``X-API-Key``). ``txt2img`` and ``img2img`` are
synchronous like A1111's: they submit one task per image, wait, and answer with base64 PNGs that carry
A1111's ``parameters`` text chunk. Errors have A1111's body (``error``, ``detail``, ``body``, ``errors``).

Deviations from A1111, on purpose:

- hires fix, refiner, face restoration, tiling, subseeds, scripts and ``alwayson_scripts`` are not
  implemented; their fields are accepted and ignored, as are all unknown fields;
- ``scheduler`` matters only for DPM++ 2M (Karras or not); other samplers run their own schedule;
- ``styles`` are this server's built-in styles (``GET /sdapi/v1/prompt-styles``); unknown names are
  ignored, as A1111 ignores styles it does not have; ``<lora:name:weight>`` prompt tags select LoRAs
  from the LoRA folder;
- options (``GET/POST /sdapi/v1/options``) are per process and in memory; only ``sd_model_checkpoint``
  (the default model of A1111 requests, server-wide) and ``CLIP_stop_at_last_layers`` have an effect;
- ``progress``, ``interrupt`` and ``skip`` see the calling key's tasks only, not the whole server's;
- inpainting ignores ``mask_blur``, ``inpainting_fill`` and ``inpaint_full_res``; images are PNG always.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import random
import re
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field

from imagegenx import __version__
from imagegenx.api.app import AppContext, error_responses
from imagegenx.api.deps import ContextDep, KeyDep
from imagegenx.api.routes_openai import (
    cancel_tasks,
    failure,
    invalid,
    open_image,
    result_bytes,
    shaped_errors,
    submit,
    validated,
    wait_for_tasks,
)
from imagegenx.api.routes_v1 import _image, _task_input
from imagegenx.api.schemas import MAX_PROMPT_CHARS, GenerateParams, Img2ImgParams, InpaintParams
from imagegenx.api.styles import STYLES, apply_style, resolve_style
from imagegenx.engine.service import TaskInput
from imagegenx.pipelines.samplers import parse_sampler
from imagegenx.postprocess.encode import read_parameters
from imagegenx.types import ApiKey, SchedulerName, TaskRecord, TaskStatus, UserError
from imagegenx.vision.imagefile import decode_image


def _a1111_error(request: Request, exc: Exception, status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": type(exc).__name__, "detail": message, "body": "", "errors": message}


class A1111ErrorBody(BaseModel):
    error: str
    detail: str
    body: str
    errors: str


router = APIRouter(
    prefix="/sdapi/v1",
    tags=["AUTOMATIC1111"],
    route_class=shaped_errors(_a1111_error),
    responses=error_responses(A1111ErrorBody),
)

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


# Options ---------------------------------------------------------------------------------------------


def _options(ctx: AppContext) -> dict[str, Any]:
    """This process's A1111 options, kept on the app context (in memory; lost on restart)."""
    if not ctx.a1111_options:
        ctx.a1111_options |= {
            "sd_model_checkpoint": ctx.settings.models.default_model,
            "CLIP_stop_at_last_layers": 1,
        }
    return ctx.a1111_options


def _checkpoint(ctx: AppContext, title: str) -> str:
    """A model reference from an A1111 checkpoint title ("name [hash]"), checked against the registry."""
    from imagegenx.models.sources import resolve

    ref = re.sub(r"\s*\[[0-9a-fA-F]*\]$", "", title.strip())
    if ref != ctx.settings.models.default_model:
        try:
            resolve(ref, ctx.settings.models)
        except UserError as exc:
            raise invalid("sd_model_checkpoint", str(exc)) from None
    return ref


def _clip_skip(value: Any) -> int:
    try:
        clip_skip = int(value)
    except (TypeError, ValueError):
        clip_skip = 0
    if not 1 <= clip_skip <= 12:
        raise invalid("CLIP_stop_at_last_layers", f"must be an integer 1-12, got {value!r}")
    return clip_skip


@router.get("/options", summary="Options (the ones this server has)")
def get_options(key: KeyDep, ctx: ContextDep) -> dict[str, Any]:
    return _options(ctx) | {
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "enable_pnginfo": True,
        "eta_noise_seed_delta": 0,
        "sd_checkpoints_limit": ctx.settings.models.max_resident_models,
    }


@router.post("/options", summary="Set options (sd_model_checkpoint, CLIP_stop_at_last_layers)")
def set_options(body: dict[str, Any], key: KeyDep, ctx: ContextDep) -> None:
    changes: dict[str, Any] = {}
    if body.get("sd_model_checkpoint") is not None:
        changes["sd_model_checkpoint"] = _checkpoint(ctx, str(body["sd_model_checkpoint"]))
    if body.get("CLIP_stop_at_last_layers") is not None:
        changes["CLIP_stop_at_last_layers"] = _clip_skip(body["CLIP_stop_at_last_layers"])
    _options(ctx).update(changes)  # other options have no meaning here and are ignored, as A1111 does


# Generation -----------------------------------------------------------------------------------------


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
    return (_image(ctx, None, value, what) if is_url else _image(ctx, value, None, what)) or b""  # decoded


def _inputs(ctx: AppContext, body: Txt2ImgRequest) -> list[TaskInput]:
    options = _options(ctx)
    overrides = body.override_settings or {}
    model = options["sd_model_checkpoint"]
    if overrides.get("sd_model_checkpoint"):
        model = _checkpoint(ctx, str(overrides["sd_model_checkpoint"]))
    clip_skip = options["CLIP_stop_at_last_layers"]
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        clip_skip = _clip_skip(overrides["CLIP_stop_at_last_layers"])
    count = (body.batch_size or 1) * (body.n_iter or 1)
    if count > MAX_IMAGES:
        raise invalid("batch_size", f"batch_size * n_iter is {count}; at most {MAX_IMAGES} images a request")
    prompt, loras = split_loras(body.prompt or "")
    negative = body.negative_prompt or ""
    styles = _known_styles(body.styles)
    for style in styles[:-1]:  # the last one is applied by _task_input, as the task's style
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
        item = _task_input(ctx, params, task, text=prompt, **images[i % len(images)])
        item.params["seed"] = seed + i
        items.append(item)
    return items


def _inverted(mask: bytes) -> bytes:
    buf = io.BytesIO()
    ImageOps.invert(decode_image(mask, "mask", mode="L")).save(buf, "PNG")
    return buf.getvalue()


def _info(records: list[TaskRecord], body: Txt2ImgRequest) -> dict[str, Any]:
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


def _answer(ctx: AppContext, records: list[TaskRecord], body: Txt2ImgRequest) -> dict[str, Any]:
    done = [r for r in records if r.status is TaskStatus.SUCCEEDED]
    if not done:  # an interrupt cancels: that answers with no images, as A1111 does
        bad = next((r for r in records if r.status is not TaskStatus.CANCELED), None)
        if bad is not None:
            raise failure(bad)
    images = [base64.b64encode(result_bytes(ctx, r)).decode("ascii") for r in done if body.send_images]
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters |= {"init_images": None, "mask": None}
    return {
        "images": images,
        "parameters": parameters,
        "info": json.dumps(_info(done, body)),
    }


async def _generate(request: Request, ctx: AppContext, key: ApiKey, body: Txt2ImgRequest) -> dict[str, Any]:
    items = await run_in_threadpool(_inputs, ctx, body)
    records = await run_in_threadpool(submit, ctx, key, items)
    records = await wait_for_tasks(request, ctx, key, [r.task_id for r in records])
    return await run_in_threadpool(_answer, ctx, records, body)


@router.post("/txt2img", summary="Text to image (A1111)")
async def txt2img(body: Txt2ImgRequest, key: KeyDep, ctx: ContextDep, request: Request) -> dict[str, Any]:
    return await _generate(request, ctx, key, body)


@router.post("/img2img", summary="Image to image and inpainting (A1111)")
async def img2img(body: Img2ImgRequest, key: KeyDep, ctx: ContextDep, request: Request) -> dict[str, Any]:
    return await _generate(request, ctx, key, body)


# Progress and control ------------------------------------------------------------------------------

_ACTIVE = (TaskStatus.QUEUED, TaskStatus.PROCESSING)
_IDLE_STATE = {
    "skipped": False,
    "interrupted": False,
    "stopping_generation": False,
    "job": "",
    "job_count": 0,
    "job_timestamp": "0",
    "job_no": 0,
    "sampling_step": 0,
    "sampling_steps": 0,
}


def _current_job(ctx: AppContext, key: ApiKey) -> list[TaskRecord]:
    """The key's queued and running tasks with the rest of their requests (batches), oldest first."""
    store = ctx.service.store
    active, _ = store.query(key.key_id, status=_ACTIVE, limit=1000)
    if not active:
        return []
    batches = {r.batch_id for r in active if r.batch_id}
    since = min(r.created_at for r in active)
    recent, _ = store.query(key.key_id, since=since, limit=1000)
    tasks = {r.task_id: r for r in recent if r.batch_id in batches} | {r.task_id: r for r in active}
    return sorted(tasks.values(), key=lambda r: (r.created_at, r.task_id))


@router.get("/progress", summary="Progress of this key's current work (A1111)")
def progress(key: KeyDep, ctx: ContextDep, skip_current_image: bool = False) -> dict[str, Any]:
    tasks = _current_job(ctx, key)
    if not tasks:
        idle = {"progress": 0.0, "eta_relative": 0.0, "state": _IDLE_STATE}
        return idle | {"current_image": None, "textinfo": None}
    done = sum(r.status.final for r in tasks)
    fraction = sum(100 if r.status.final else r.progress for r in tasks) / (100 * len(tasks))
    running = next((r for r in tasks if r.status is TaskStatus.PROCESSING), None)
    steps = int(running.params.get("steps", 0)) if running else 0
    first = tasks[0]
    state = _IDLE_STATE | {
        "job": "scripts_txt2img" if first.task_type == "text2img" else "scripts_img2img",
        "job_count": len(tasks),
        "job_timestamp": datetime.fromtimestamp(first.created_at).strftime("%Y%m%d%H%M%S"),
        "job_no": done,
        "sampling_step": round(running.progress * steps / 100) if running else 0,
        "sampling_steps": steps,
    }
    eta = max(ctx.service.estimated_seconds(r) for r in tasks)
    return {
        "progress": round(fraction, 4),
        "eta_relative": eta,
        "state": state,
        "current_image": None,  # no live previews
        "textinfo": None,
    }


@router.post("/interrupt", summary="Stop this key's current request (A1111)")
def interrupt(key: KeyDep, ctx: ContextDep) -> dict[str, Any]:
    active = [r for r in _current_job(ctx, key) if not r.status.final]
    running = [r for r in active if r.status is TaskStatus.PROCESSING] or active[:1]
    ids = {r.task_id for r in running}
    batches = {r.batch_id for r in running if r.batch_id}
    cancel_tasks(ctx, key, [r.task_id for r in active if r.task_id in ids or r.batch_id in batches])
    return {}


@router.post("/skip", summary="Skip this key's running images (A1111)")
def skip(key: KeyDep, ctx: ContextDep) -> None:
    active, _ = ctx.service.store.query(key.key_id, status=TaskStatus.PROCESSING, limit=1000)
    cancel_tasks(ctx, key, [r.task_id for r in active])


# Listings --------------------------------------------------------------------------------------------


@router.get("/sd-models", summary="Checkpoints (A1111)")
def sd_models(key: KeyDep, ctx: ContextDep) -> list[dict[str, Any]]:
    from imagegenx.models.sources import list_models

    found = {m.name: m.location for m in list_models(ctx.settings.models) if m.source != "refused"}
    for name in (ctx.settings.models.default_model, _options(ctx)["sd_model_checkpoint"]):
        found.setdefault(name, name)
    return [
        {
            "title": name,
            "model_name": name.removesuffix(".safetensors"),
            "hash": None,
            "sha256": None,
            "filename": location,
            "config": None,
        }
        for name, location in found.items()
    ]


@router.post("/refresh-checkpoints", summary="No-op: the checkpoint list is read on every request")
def refresh_checkpoints(key: KeyDep) -> None:
    return None


@router.get("/samplers", summary="Samplers (A1111 names)")
def samplers(key: KeyDep) -> list[dict[str, Any]]:
    return [
        {
            "name": s.a1111_name,
            "aliases": [s.value],
            "options": {"scheduler": "karras"} if s is SchedulerName.DPMPP_2M_KARRAS else {},
        }
        for s in SchedulerName
    ]


@router.get("/schedulers", summary="Schedulers (only DPM++ 2M uses one)")
def schedulers(key: KeyDep) -> list[dict[str, Any]]:
    rows = [
        ("automatic", "Automatic", -1.0, False),
        ("uniform", "Uniform", -1.0, True),
        ("karras", "Karras", 7.0, False),
    ]
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": rho, "need_inner_model": inner}
        for name, label, rho, inner in rows
    ]


@router.get("/upscalers", summary="Upscalers (A1111)")
def upscalers(key: KeyDep) -> list[dict[str, Any]]:
    # Only A1111's two built-in entries until the upscaler lands; then list its models here too.
    none = {"model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
    return [{"name": "None", **none}, {"name": "Lanczos", **none}]


@router.get("/prompt-styles", summary="This server's style presets, as A1111 styles")
def prompt_styles(key: KeyDep) -> list[dict[str, Any]]:
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative} for s in STYLES.values()]


# PNG info ----------------------------------------------------------------------------------------------


class PngInfoRequest(BaseModel):
    image: str = Field(description="The image, base64 (data: URLs accepted)")


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


def _png_info(ctx: AppContext, body: PngInfoRequest) -> dict[str, Any]:
    data = _image(ctx, body.image.strip(), None, "image") or b""
    text = read_parameters(data) or ""
    with open_image(data, "image") as image:
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}


@router.post("/png-info", summary="Generation parameters embedded in an image (A1111)")
def png_info(body: PngInfoRequest, key: KeyDep, ctx: ContextDep) -> dict[str, Any]:
    return _png_info(ctx, body)
