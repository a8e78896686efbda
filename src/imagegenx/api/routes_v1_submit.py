"""The ImageGenX v1 routes that create tasks: text to image, img2img and inpaint (JSON or multipart
upload) and batches of texts under one batch id."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from imagegenx.api.app import ErrorBody, error_responses
from imagegenx.api.deps import ContextDep, KeyDep
from imagegenx.api.schemas import (
    BatchGenerateParams,
    Envelope,
    GenerateParams,
    Img2ImgParams,
    InpaintParams,
    Submitted,
)
from imagegenx.api.task_inputs import (
    build_task_input,
    form_params,
    input_image_bytes,
    read_upload,
    submitted_envelope,
)

router = APIRouter(prefix="/api/v1", tags=["imagegenx v1"], responses=error_responses(ErrorBody))


@router.post("/image/generate", summary="Text to image", response_model=Envelope[Submitted])
def generate(body: GenerateParams, key: KeyDep, ctx: ContextDep) -> Envelope[Submitted]:
    return submitted_envelope(ctx.service.submit(key, [build_task_input(ctx, body, "text2img")]))


@router.post(
    "/image/img2img", summary="Image to image (base64 or image_url)", response_model=Envelope[Submitted]
)
def img2img(body: Img2ImgParams, key: KeyDep, ctx: ContextDep) -> Envelope[Submitted]:
    image = input_image_bytes(ctx, body.image, body.image_url, "image")
    return submitted_envelope(
        ctx.service.submit(key, [build_task_input(ctx, body, "img2img", init_image=image)])
    )


@router.post("/image/inpaint", summary="Inpaint (base64 or URLs)", response_model=Envelope[Submitted])
def inpaint(body: InpaintParams, key: KeyDep, ctx: ContextDep) -> Envelope[Submitted]:
    image = input_image_bytes(ctx, body.image, body.image_url, "image")
    mask = input_image_bytes(ctx, body.mask, body.mask_url, "mask")
    item = build_task_input(ctx, body, "inpaint", init_image=image, mask_image=mask)
    return submitted_envelope(ctx.service.submit(key, [item]))


@router.post(
    "/image/img2img/upload", summary="Image to image (multipart upload)", response_model=Envelope[Submitted]
)
async def img2img_upload(
    key: KeyDep,
    ctx: ContextDep,
    image: Annotated[UploadFile, File(description="The input image")],
    params: Annotated[str, Form(description="Img2ImgParams as JSON")] = "{}",
) -> Envelope[Submitted]:
    body = form_params(Img2ImgParams, params)
    data = await read_upload(ctx, image, "image")
    item = build_task_input(ctx, body, "img2img", init_image=data)
    return submitted_envelope(await run_in_threadpool(ctx.service.submit, key, [item]))


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
    body = form_params(InpaintParams, params)
    image_data, mask_data = await read_upload(ctx, image, "image"), await read_upload(ctx, mask, "mask")
    item = build_task_input(ctx, body, "inpaint", init_image=image_data, mask_image=mask_data)
    return submitted_envelope(await run_in_threadpool(ctx.service.submit, key, [item]))


@router.post("/image/batch-generate", summary="Many texts, one batch id", response_model=Envelope[Submitted])
def batch_generate(body: BatchGenerateParams, key: KeyDep, ctx: ContextDep) -> Envelope[Submitted]:
    items = []
    for text in body.texts:
        for i in range(body.batch_size):
            item = build_task_input(ctx, body, "text2img", text=text)
            item.params["seed"] = item.params["seed"] + i if body.seed is not None else item.params["seed"]
            items.append(item)
    batch_id = uuid.uuid4().hex
    return submitted_envelope(ctx.service.submit(key, items, batch_id=batch_id), batch_id)
