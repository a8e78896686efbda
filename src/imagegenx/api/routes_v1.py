"""The ImageGenX v1 API (seed 003): generate, img2img, inpaint, batch, tasks, history, downloads, LoRAs."""

from __future__ import annotations

import asyncio
import io
import json
import queue
import random
import uuid
import zipfile
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import ValidationError

from imagegenx.api import ssrf
from imagegenx.api.app import AppContext, ErrorBody, NotFound, error_responses
from imagegenx.api.deps import ContextDep, KeyDep
from imagegenx.api.schemas import (
    BatchGenerateParams,
    Envelope,
    GenerateParams,
    Img2ImgParams,
    InpaintParams,
    Page,
    Submitted,
    TaskView,
    decode_base64_image,
)
from imagegenx.api.styles import STYLES, apply_style
from imagegenx.engine.service import Forbidden, TaskInput
from imagegenx.pipelines.samplers import parse_sampler
from imagegenx.types import ApiKey, TaskRecord, TaskStatus, Tier, UserError
from imagegenx.vision.imagefile import decode_image

router = APIRouter(prefix="/api/v1", tags=["imagegenx v1"], responses=error_responses(ErrorBody))
# An image task's results: the original and two thumbnails; a portrait task's also its ranked images
# ("rank1" ...), the report and the contact sheet.
VERSION_PATTERN = "^(original|512|256|report|contact_sheet|rank[0-9]{1,3})$"
MEDIA_TYPES = {
    ".webp": "image/webp",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".avif": "image/avif",
    ".json": "application/json",
}


# Submitting ---------------------------------------------------------------------------------------


def _task_input(
    ctx: AppContext, p: GenerateParams, task: str, text: str | None = None, **images
) -> TaskInput:
    user_prompt = text if text is not None else p.text
    if ctx.prompt_filter is not None:
        ctx.prompt_filter.enforce(user_prompt)  # PromptBlocked: a 400 that names the reason
    prompt, negative = apply_style(p.style, user_prompt, p.negative_prompt)
    width, height = p.size
    loras = [lora.model_dump() for lora in p.loras]
    if p.lora_name:
        loras.append({"name": p.lora_name, "weight": p.lora_weight})
    if p.callback_url:
        ssrf.check_url(p.callback_url, allow_hosts=ctx.settings.service.allowed_private_hosts)
    params = {
        "prompt": prompt,
        "negative_prompt": negative,
        "model": p.model or ctx.settings.models.default_model,
        "width": width,
        "height": height,
        "steps": p.steps,
        "guidance_scale": p.cfg_scale,
        "scheduler": parse_sampler(p.sampler).value,
        "seed": p.seed if p.seed is not None else random.randrange(2**32),
        "clip_skip": p.clip_skip,
        "task": task,
        "strength": getattr(p, "strength", 0.75),
        "loras": loras,
        "priority": p.priority,
    }
    post = p.postprocess.model_dump(exclude_defaults=True) if p.postprocess else {}
    # The flat fields are shorthands for the chain's.
    flat = {"upscale": p.upscale, "watermark_text": p.watermark, "invisible_watermark": p.invisible_watermark}
    post |= {k: v for k, v in flat.items() if v and v != 1}
    if "face_restore" in post:
        post["face_restore"] = str(
            model_file(ctx, post["face_restore"], ".safetensors", "face restoration model")
        )
    if post:
        params["postprocess"] = post
    if not p.embed_metadata:
        params["embed_metadata"] = False
    return TaskInput(params, p.priority, p.callback_url, p.style, output_format=p.format.lower(), **images)


def model_file(ctx: AppContext, name: str, suffix: str, what: str) -> Path:
    """A helper model's file by name in the model folder (a GFPGAN, ArcFace or depth model). Never a
    path: a request cannot reach other files."""
    file = name if name.endswith(suffix) else f"{name}{suffix}"
    path = ctx.settings.models.model_dir / file
    if ".." in name or "/" in name or not path.is_file():
        raise UserError(f"no {what} {file!r} in the server's model folder")
    return path


def _submitted(records: list[TaskRecord], batch_id: str | None = None) -> Envelope[Submitted]:
    return Envelope(data=Submitted(task_ids=[r.task_id for r in records], batch_id=batch_id))


def _image(
    ctx: AppContext, b64: str | None, url: str | None, what: str, required: bool = True
) -> bytes | None:
    limit = ctx.settings.service.max_upload_bytes
    if b64:
        return _checked(decode_base64_image(b64, what, limit), what)
    if url:
        hosts = ctx.settings.service.allowed_private_hosts
        return _checked(ssrf.fetch(url, max_bytes=limit, allow_hosts=hosts), what)
    if required:
        raise UserError(f"{what} is required: give it as base64, an upload, or a URL")
    return None


@router.post("/image/generate", summary="Text to image", response_model=Envelope[Submitted])
def generate(body: GenerateParams, key: KeyDep, ctx: ContextDep) -> Envelope[Submitted]:
    return _submitted(ctx.service.submit(key, [_task_input(ctx, body, "text2img")]))


@router.post(
    "/image/img2img", summary="Image to image (base64 or image_url)", response_model=Envelope[Submitted]
)
def img2img(body: Img2ImgParams, key: KeyDep, ctx: ContextDep) -> Envelope[Submitted]:
    image = _image(ctx, body.image, body.image_url, "image")
    return _submitted(ctx.service.submit(key, [_task_input(ctx, body, "img2img", init_image=image)]))


@router.post("/image/inpaint", summary="Inpaint (base64 or URLs)", response_model=Envelope[Submitted])
def inpaint(body: InpaintParams, key: KeyDep, ctx: ContextDep) -> Envelope[Submitted]:
    image = _image(ctx, body.image, body.image_url, "image")
    mask = _image(ctx, body.mask, body.mask_url, "mask")
    item = _task_input(ctx, body, "inpaint", init_image=image, mask_image=mask)
    return _submitted(ctx.service.submit(key, [item]))


async def _read_upload(ctx: AppContext, upload: UploadFile | None, what: str) -> bytes | None:
    if upload is None:
        return None
    limit = ctx.settings.service.max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{what} is larger than {limit} bytes")
    return await run_in_threadpool(_checked, data, what)


def _checked(data: bytes, what: str) -> bytes:
    """``data`` once it decodes: a bad image is the client's error now (400), not a failed task later."""
    decode_image(data, what, mode=None, max_bytes=len(data))  # the caller applied the upload limit
    return data


def _form_params(model: type[Img2ImgParams], params: str) -> Img2ImgParams:
    try:
        return model.model_validate(json.loads(params or "{}"))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise UserError(f"params: {exc}".splitlines()[0]) from None


@router.post(
    "/image/img2img/upload", summary="Image to image (multipart upload)", response_model=Envelope[Submitted]
)
async def img2img_upload(
    key: KeyDep,
    ctx: ContextDep,
    image: Annotated[UploadFile, File(description="The input image")],
    params: Annotated[str, Form(description="Img2ImgParams as JSON")] = "{}",
) -> Envelope[Submitted]:
    body = _form_params(Img2ImgParams, params)
    data = await _read_upload(ctx, image, "image")
    item = _task_input(ctx, body, "img2img", init_image=data)
    return _submitted(await run_in_threadpool(ctx.service.submit, key, [item]))


@router.post(
    "/image/inpaint/upload", summary="Inpaint (multipart upload)", response_model=Envelope[Submitted]
)
async def inpaint_upload(
    key: KeyDep,
    ctx: ContextDep,
    image: Annotated[UploadFile, File(description="The input image")],
    mask: Annotated[UploadFile, File(description="The mask: white = repaint")],
    params: Annotated[str, Form(description="InpaintParams as JSON")] = "{}",
) -> Envelope[Submitted]:
    body = _form_params(InpaintParams, params)
    image_data, mask_data = await _read_upload(ctx, image, "image"), await _read_upload(ctx, mask, "mask")
    item = _task_input(ctx, body, "inpaint", init_image=image_data, mask_image=mask_data)
    return _submitted(await run_in_threadpool(ctx.service.submit, key, [item]))


@router.post("/image/batch-generate", summary="Many texts, one batch id", response_model=Envelope[Submitted])
def batch_generate(body: BatchGenerateParams, key: KeyDep, ctx: ContextDep) -> Envelope[Submitted]:
    items = []
    for text in body.texts:
        for i in range(body.batch_size):
            item = _task_input(ctx, body, "text2img", text=text)
            item.params["seed"] = item.params["seed"] + i if body.seed is not None else item.params["seed"]
            items.append(item)
    batch_id = uuid.uuid4().hex
    return _submitted(ctx.service.submit(key, items, batch_id=batch_id), batch_id)


# Tasks --------------------------------------------------------------------------------------------


def _view(ctx: AppContext, record: TaskRecord, base_url: str) -> TaskView:
    base = (ctx.settings.service.public_url or base_url).rstrip("/")
    urls = {
        version: f"{base}/api/v1/image/task/{record.task_id}/download?version={version}"
        for version in record.results
    }
    return TaskView(
        task_id=record.task_id,
        status=str(record.status),
        progress=record.progress,
        estimated_seconds=ctx.service.estimated_seconds(record),
        task_type=record.task_type,
        model=record.model,
        width=record.width,
        height=record.height,
        style=record.style,
        priority=record.priority,
        attempts=record.attempts,
        error=record.error,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        batch_id=record.batch_id,
        urls=urls,
        params=record.params,
        metadata=record.metadata,
    )


def _record(ctx: AppContext, task_id: str, key: ApiKey) -> TaskRecord:
    try:
        return ctx.service.get(task_id, key)
    except KeyError:
        raise NotFound(f"no task {task_id!r} for this key") from None


@router.get(
    "/image/task/{task_id}",
    summary="A task's status, progress and result URLs",
    response_model=Envelope[TaskView],
)
def get_task(task_id: str, key: KeyDep, ctx: ContextDep, request: Request) -> Envelope[TaskView]:
    return Envelope(data=_view(ctx, _record(ctx, task_id, key), str(request.base_url)))


@router.post(
    "/image/task/{task_id}/cancel",
    summary="Cancel a queued or running task",
    response_model=Envelope[TaskView],
)
def cancel_task(task_id: str, key: KeyDep, ctx: ContextDep, request: Request) -> Envelope[TaskView]:
    try:
        ctx.service.cancel(task_id, key)
    except KeyError:
        raise NotFound(f"no task {task_id!r} for this key") from None
    return Envelope(data=_view(ctx, _record(ctx, task_id, key), str(request.base_url)))


@router.get(
    "/image/task/{task_id}/events",
    summary="Progress as Server-Sent Events",
    response_class=EventSourceResponse,
)
async def task_events(
    task_id: str, key: KeyDep, ctx: ContextDep, request: Request
) -> AsyncIterable[ServerSentEvent]:
    record = await run_in_threadpool(_record, ctx, task_id, key)
    subscription = ctx.service.events.subscribe(task_id)
    try:
        yield ServerSentEvent(
            event="status", data={"status": str(record.status), "progress": record.progress}
        )
        status = record.status
        while not status.final and not await request.is_disconnected():
            try:
                event = await asyncio.to_thread(subscription.get, True, 5.0)
            except queue.Empty:
                record = await run_in_threadpool(_record, ctx, task_id, key)  # missed events: ask the DB
                event = {"status": str(record.status), "progress": record.progress}
            status = TaskStatus(event["status"])
            yield ServerSentEvent(event="status", data=event)
    finally:
        ctx.service.events.unsubscribe(task_id, subscription)


@router.get(
    "/image/task/{task_id}/download",
    summary="One result image",
    response_class=Response,
    responses={307: {"description": "Redirect to a presigned S3 URL, valid 1 h (storage.s3_presign)"}},
)
def download(
    task_id: str,
    key: KeyDep,
    ctx: ContextDep,
    version: Annotated[str, Query(pattern=VERSION_PATTERN)] = "original",
) -> Response:
    record = _record(ctx, task_id, key)
    blob_key = record.results.get(version)
    if blob_key is None:
        raise NotFound(f"task {task_id} has no {version} result (status {record.status})")
    signed = ctx.service.blobs.presigned_url(blob_key)  # with storage.s3_presign: S3 serves the bytes
    if signed is not None:
        return RedirectResponse(signed, status_code=307)
    extension = blob_key[blob_key.rfind(".") :]
    filename = f"{task_id}-{version}{extension}"
    return Response(
        ctx.service.blobs.get(blob_key),
        media_type=MEDIA_TYPES.get(extension, "application/octet-stream"),
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/image/download.zip", summary="Several results as one ZIP", response_class=Response)
def download_zip(
    key: KeyDep,
    ctx: ContextDep,
    task_ids: Annotated[str | None, Query(description="Comma-separated task ids", max_length=4000)] = None,
    batch_id: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    if batch_id:
        records = [r for r in ctx.service.store.query(key.key_id, limit=1000)[0] if r.batch_id == batch_id]
    else:
        ids = [t for t in (task_ids or "").split(",") if t][:200]
        records = [_record(ctx, t, key) for t in ids]
    done = [r for r in records if "original" in r.results]
    if not done:
        raise NotFound("none of these tasks has a finished image")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for r in done:
            blob_key = r.results["original"]
            archive.writestr(f"{r.task_id}{blob_key[blob_key.rfind('.') :]}", ctx.service.blobs.get(blob_key))
            archive.writestr(f"{r.task_id}.json", json.dumps(r.metadata, indent=2))
    return Response(
        buf.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": 'attachment; filename="images.zip"'},
    )


@router.get("/image/tasks", summary="History of this key's tasks (90 days)", response_model=Envelope[Page])
def history(
    key: KeyDep,
    ctx: ContextDep,
    request: Request,
    status: Annotated[TaskStatus | None, Query()] = None,
    style: Annotated[str | None, Query(max_length=64)] = None,
    resolution: Annotated[str | None, Query(pattern=r"^\d{2,4}x\d{2,4}$")] = None,
    since: Annotated[float | None, Query(ge=0, description="Unix seconds")] = None,
    until: Annotated[float | None, Query(ge=0)] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Envelope[Page]:
    width = height = None
    if resolution:
        width, height = (int(v) for v in resolution.split("x"))
    items, total = ctx.service.store.query(
        key.key_id,
        status=status,
        style=style,
        width=width,
        height=height,
        since=since,
        until=until,
        limit=page_size,
        offset=(page - 1) * page_size,
    )
    views = [_view(ctx, r, str(request.base_url)) for r in items]
    return Envelope(data=Page(items=views, total=total, page=page, page_size=page_size))


# Models, LoRAs, styles ----------------------------------------------------------------------------


@router.get("/models", summary="Models this server can load", response_model=Envelope[list[dict]])
def models(key: KeyDep, ctx: ContextDep) -> Envelope[list[dict]]:
    from imagegenx.models.sources import list_models

    return Envelope(data=[info.__dict__ for info in list_models(ctx.settings.models)])


@router.get("/loras", summary="LoRAs in the LoRA folder", response_model=Envelope[list[str]])
def loras(key: KeyDep, ctx: ContextDep) -> Envelope[list[str]]:
    from imagegenx.models.lora import LoraLibrary

    return Envelope(data=LoraLibrary(ctx.settings.models.lora_dir).names())


@router.get("/styles", summary="Built-in style presets", response_model=Envelope[list[dict]])
def styles(key: KeyDep) -> Envelope[list[dict]]:
    return Envelope(data=[{"name": s.name, "label": s.label} for s in STYLES.values()])


@router.post("/lora/upload", summary="Upload a .safetensors LoRA (paid tier)", response_model=Envelope[dict])
async def upload_lora(
    key: KeyDep, ctx: ContextDep, file: Annotated[UploadFile, File(description="A .safetensors LoRA")]
) -> Envelope[dict]:
    from imagegenx.api.lora_upload import save_lora

    if key.tier is not Tier.PAID:
        raise Forbidden("LoRA upload is a paid-tier feature")
    limit = ctx.settings.service.max_lora_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"the LoRA is larger than {limit} bytes")
    name = await run_in_threadpool(save_lora, ctx.settings.models.lora_dir, file.filename or "", data)
    return Envelope(data={"name": name})
