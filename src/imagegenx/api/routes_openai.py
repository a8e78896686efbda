"""The OpenAI Images API on the task service: ``/v1/images/generations``, ``/edits`` and ``/v1/models``.

Existing OpenAI clients work unchanged: give them ``<server>/v1`` as base URL and an imagegenx API key.
The routes are synchronous from the client's view: they submit tasks, wait for them without holding
a thread (task events, with the database as the fallback), then answer with the images. Errors on
these paths have OpenAI's ``{"error": {...}}`` body; ``/api/v1`` keeps its envelope.

Deviations from OpenAI, on purpose:

- ``url`` results point at this server's download route, which wants the same API key (OpenAI's
  URLs are pre-signed and public for an hour);
- OpenAI model names (``dall-e-*``, ``gpt-image-*``, ...) mean the server's default model; any other
  name is an imagegenx model reference and must exist;
- a size is any ``WxH`` the model takes (multiples of 8), not only OpenAI's list; ``auto`` is 1024x1024
  for generations and the input image's size for edits;
- ``quality``, ``style``, ``background``, ``moderation``, ``output_compression`` and ``user`` are accepted
  and ignored; ``stream`` is refused; ``revised_prompt`` is always null; ``usage`` is not reported;
- edits use the first image when several are sent;
- extensions: ``negative_prompt``, ``seed`` (image i gets seed + i), ``steps``, and for edits ``strength``.

The request bodies and their translation into tasks are in ``openai_schemas``; error bodies in
OpenAI's shape come from ``shaped_errors``, submit-then-wait from ``sync_tasks`` (both shared with the
AUTOMATIC1111 routes).
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from imagegenx.api.app import AppContext, error_responses
from imagegenx.api.deps import ContextDep, KeyDep
from imagegenx.api.openai_schemas import (
    ImageGenerationRequest,
    OpenAIErrorBody,
    default_format,
    edit_items,
    extensions,
    generation_items,
    model_ref,
)
from imagegenx.api.schemas import MAX_PROMPT_CHARS
from imagegenx.api.shaped_errors import error_param, invalid, shaped_errors
from imagegenx.api.sync_tasks import failure, result_bytes, submit, wait_for_tasks
from imagegenx.api.task_inputs import read_upload
from imagegenx.api.task_views import task_view
from imagegenx.types import TaskRecord, TaskStatus


def _answer(
    ctx: AppContext, request: Request, records: list[TaskRecord], response_format: str, created: int
) -> dict[str, Any]:
    for record in records:
        if record.status is not TaskStatus.SUCCEEDED:
            raise failure(record)
    data = []
    for record in records:
        if response_format == "url":
            url = task_view(ctx, record, str(request.base_url)).urls["original"]
            data.append({"url": url, "revised_prompt": None})
        else:
            b64 = base64.b64encode(result_bytes(ctx, record)).decode("ascii")
            data.append({"b64_json": b64, "revised_prompt": None})
    return {"created": created, "data": data}


def _openai_error(request: Request, exc: Exception, status: int, message: str) -> tuple[int, dict[str, Any]]:
    status = 400 if status == 422 else status  # OpenAI says 400 for every invalid parameter
    code = None
    if status == 429:
        code = "rate_limit_exceeded"
    elif status == 401 and (request.headers.get("authorization") or request.headers.get("x-api-key")):
        code = "invalid_api_key"
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return status, {"error": {"message": message, "type": kind, "param": error_param(exc), "code": code}}


router = APIRouter(
    prefix="/v1",
    tags=["OpenAI Images"],
    route_class=shaped_errors(_openai_error),
    responses=error_responses(OpenAIErrorBody),
)


@router.post("/images/generations", summary="Create images (OpenAI Images API)")
async def generations(
    body: ImageGenerationRequest, key: KeyDep, ctx: ContextDep, request: Request
) -> dict[str, Any]:
    created = int(time.time())
    if body.stream:
        raise invalid("stream", "streaming is not supported by this server; leave stream unset")
    items = await run_in_threadpool(generation_items, ctx, body)
    records = await run_in_threadpool(submit, ctx, key, items)
    records = await wait_for_tasks(request, ctx, key, [r.task_id for r in records])
    response_format = body.response_format or default_format(body.model)
    return await run_in_threadpool(_answer, ctx, request, records, response_format, created)


@router.post("/images/edits", summary="Edit an image (OpenAI Images API, multipart)")
async def edits(
    key: KeyDep,
    ctx: ContextDep,
    request: Request,
    prompt: Annotated[str, Form(min_length=1, max_length=MAX_PROMPT_CHARS)],
    image: Annotated[list[UploadFile] | None, File(description="The image to edit")] = None,
    images: Annotated[list[UploadFile] | None, File(alias="image[]", description="First one used")] = None,
    mask: Annotated[UploadFile | None, File(description="PNG, transparent where to edit")] = None,
    model: Annotated[str | None, Form(max_length=512)] = None,
    n: Annotated[int, Form(ge=1, le=10)] = 1,
    size: Annotated[str | None, Form(max_length=32)] = None,
    response_format: Annotated[Literal["url", "b64_json"] | None, Form()] = None,
    output_format: Annotated[Literal["png", "webp", "jpeg"] | None, Form()] = None,
    negative_prompt: Annotated[str | None, Form(max_length=MAX_PROMPT_CHARS)] = None,
    seed: Annotated[int | None, Form(ge=0, lt=2**63)] = None,
    steps: Annotated[int | None, Form(ge=1, le=150)] = None,
    strength: Annotated[float | None, Form(gt=0, le=1)] = None,
) -> dict[str, Any]:
    created = int(time.time())
    uploads = [*(image or []), *(images or [])]
    if not uploads:
        raise invalid("image", "an image file is required")
    image_data = await read_upload(ctx, uploads[0], "image")
    mask_data = await read_upload(ctx, mask, "mask")
    values = {"text": prompt, "model": await run_in_threadpool(model_ref, ctx, model)}
    values |= extensions(negative_prompt, seed, steps, output_format or "png")
    items = await run_in_threadpool(edit_items, ctx, image_data, mask_data, values, size, n, strength)
    records = await run_in_threadpool(submit, ctx, key, items)
    records = await wait_for_tasks(request, ctx, key, [r.task_id for r in records])
    response_format = response_format or default_format(model)
    return await run_in_threadpool(_answer, ctx, request, records, response_format, created)


@router.get("/models", summary="Models this server can load (OpenAI's list shape)")
def models(key: KeyDep, ctx: ContextDep) -> dict[str, Any]:
    from imagegenx.models.sources import list_models

    found = [m.name for m in list_models(ctx.settings.models) if m.source != "refused"]
    if ctx.settings.models.default_model not in found:
        found.insert(0, ctx.settings.models.default_model)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "imagegenx"} for name in found]
    return {"object": "list", "data": data}
