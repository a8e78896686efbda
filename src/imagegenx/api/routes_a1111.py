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

The request bodies, options and their translation into tasks are in ``a1111_schemas``.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from imagegenx.api.a1111_schemas import (
    A1111ErrorBody,
    Img2ImgRequest,
    PngInfoRequest,
    Txt2ImgRequest,
    checkpoint_ref,
    current_options,
    generation_info,
    parse_clip_skip,
    parse_infotext,
    task_inputs,
)
from imagegenx.api.app import AppContext, error_responses
from imagegenx.api.deps import ContextDep, KeyDep
from imagegenx.api.shaped_errors import shaped_errors
from imagegenx.api.styles import STYLES
from imagegenx.api.sync_tasks import cancel_tasks, failure, result_bytes, submit, wait_for_tasks
from imagegenx.api.task_inputs import input_image_bytes
from imagegenx.postprocess.encode import read_parameters
from imagegenx.types import ApiKey, SchedulerName, TaskRecord, TaskStatus
from imagegenx.vision.imagefile import decode_image


def _a1111_error(request: Request, exc: Exception, status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": type(exc).__name__, "detail": message, "body": "", "errors": message}


router = APIRouter(
    prefix="/sdapi/v1",
    tags=["AUTOMATIC1111"],
    route_class=shaped_errors(_a1111_error),
    responses=error_responses(A1111ErrorBody),
)


# Options ---------------------------------------------------------------------------------------------


@router.get("/options", summary="Options (the ones this server has)")
def get_options(key: KeyDep, ctx: ContextDep) -> dict[str, Any]:
    return current_options(ctx) | {
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
        changes["sd_model_checkpoint"] = checkpoint_ref(ctx, str(body["sd_model_checkpoint"]))
    if body.get("CLIP_stop_at_last_layers") is not None:
        changes["CLIP_stop_at_last_layers"] = parse_clip_skip(body["CLIP_stop_at_last_layers"])
    # other options have no meaning here and are ignored, as A1111 does
    current_options(ctx).update(changes)


# Generation -----------------------------------------------------------------------------------------


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
        "info": json.dumps(generation_info(done, body)),
    }


async def _generate(request: Request, ctx: AppContext, key: ApiKey, body: Txt2ImgRequest) -> dict[str, Any]:
    items = await run_in_threadpool(task_inputs, ctx, body)
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
    for name in (ctx.settings.models.default_model, current_options(ctx)["sd_model_checkpoint"]):
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


def _png_info(ctx: AppContext, body: PngInfoRequest) -> dict[str, Any]:
    data = input_image_bytes(ctx, body.image.strip(), None, "image") or b""
    text = read_parameters(data) or ""
    with decode_image(data, "image", mode=None) as image:
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}


@router.post("/png-info", summary="Generation parameters embedded in an image (A1111)")
def png_info(body: PngInfoRequest, key: KeyDep, ctx: ContextDep) -> dict[str, Any]:
    return _png_info(ctx, body)
