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

This module also holds what the AUTOMATIC1111 routes share with it: per-router error bodies
(``shaped_errors``) and submit-then-wait (``submit`` and ``wait_for_tasks``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import io
import json
import logging
import queue
import re
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagegenx.api.app import AppContext, error_responses
from imagegenx.api.deps import ContextDep, KeyDep
from imagegenx.api.routes_v1 import _read_upload, _record, _task_input, _view
from imagegenx.api.schemas import MAX_PROMPT_CHARS, GenerateParams, Img2ImgParams, InpaintParams
from imagegenx.engine.service import TaskInput
from imagegenx.types import ApiKey, TaskRecord, TaskStatus, UserError
from imagegenx.vision.imagefile import decode_image

log = logging.getLogger("imagegenx.api")

# Errors in each API's own shape --------------------------------------------------------------------

# (request, exception, status the app's handler chose, its message) → (status, body)
ErrorRenderer = Callable[[Request, Exception, int, str], tuple[int, dict[str, Any]]]


class TaskFailure(Exception):
    """A synchronous request's tasks ended badly: an image failed (500), nothing in time (504), ..."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def native_error(request: Request, exc: Exception) -> tuple[int, str, dict[str, str]] | None:
    """(status, message, headers) of the app's own answer to ``exc``; None when no handler takes it.

    Asking the app's handlers keeps one status mapping for all three APIs.
    """
    if isinstance(exc, TaskFailure):
        return exc.status, str(exc), {}
    handlers = request.app.exception_handlers
    handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
    if handler is None:
        return None
    response = handler(request, exc)
    if inspect.isawaitable(response):
        response = await response
    try:
        body = json.loads(response.body)
    except (AttributeError, ValueError):
        body = None
    body = body if isinstance(body, dict) else {}
    message = body.get("message") or body.get("detail") or str(exc) or type(exc).__name__
    headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    return response.status_code, str(message), headers


def error_param(exc: Exception) -> str | None:
    """The request field a validation error is about (``size``, ``n``), as the app's message names it."""
    if not isinstance(exc, RequestValidationError) or not exc.errors():
        return None
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":  # its loc is a position in the body, not a field
        return None
    return ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None


def shaped_errors(render: ErrorRenderer) -> type[APIRoute]:
    """A route class whose errors (from dependencies, validation or the route) get ``render``'s body.

    Set on a router, it changes error bodies for that router's paths only; statuses and Retry-After
    stay those of the app's handlers.
    """

    class ShapedErrorRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def run(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    native = await native_error(request, exc)
                    if native is None:  # a bug: still answer in this API's shape, and log it
                        log.exception("unhandled error in %s %s", request.method, request.url.path)
                        native = (500, "internal server error", {})
                    status, message, headers = native
                    status, body = render(request, exc, status, message)
                    return JSONResponse(body, status_code=status, headers=headers)

            return run

    return ShapedErrorRoute


def invalid(field: str, message: str) -> RequestValidationError:
    """A validation error about one request field, reported like FastAPI's own."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message}])


P = TypeVar("P", bound=GenerateParams)


def validated(model: type[P], values: dict[str, Any], names: dict[str, str]) -> P:
    """``model`` from ``values``; errors name the client's fields (``names``: our field → theirs)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        errors = [
            {**e, "loc": ("body", *(names.get(str(p), p) for p in e["loc"]))}
            for e in exc.errors(include_url=False, include_context=False)
        ]
        raise RequestValidationError(errors) from None


# Submitting and waiting ----------------------------------------------------------------------------

POLL_S = 0.1  # how often a waiting request looks at its task events
DB_CHECK_S = 1.0  # how often it asks the database anyway (events are per process and may be missed)
MAX_RUN_S = 600.0  # beyond the queue's own expiry, how long a request waits for its images


def submit(ctx: AppContext, key: ApiKey, items: list[TaskInput]) -> list[TaskRecord]:
    """Submit one request's images as one batch (the A1111 progress route groups by it)."""
    return ctx.service.submit(key, items, batch_id=uuid.uuid4().hex)


def _final_records(ctx: AppContext, key: ApiKey, task_ids: list[str]) -> dict[str, TaskRecord]:
    records = (_record(ctx, task_id, key) for task_id in task_ids)
    return {r.task_id: r for r in records if r.status.final}


def cancel_tasks(ctx: AppContext, key: ApiKey, task_ids: list[str]) -> None:
    for task_id in task_ids:
        with contextlib.suppress(KeyError):  # gone meanwhile (history purge)
            ctx.service.cancel(task_id, key)


async def wait_for_tasks(
    request: Request, ctx: AppContext, key: ApiKey, task_ids: list[str]
) -> list[TaskRecord]:
    """The tasks' final records, in order. Holds no thread while waiting.

    Gives up (cancelling what is left) when the client goes away or after the queue's expiry plus
    ``MAX_RUN_S``: then 504.
    """
    events = ctx.service.events
    subscriptions = {task_id: events.subscribe(task_id) for task_id in task_ids}
    final: dict[str, TaskRecord] = {}
    deadline = time.monotonic() + ctx.settings.service.queued_task_ttl_s + MAX_RUN_S
    next_check = 0.0  # subscribed first, then read: nothing that ends in between is missed
    try:
        while True:
            heard_final = False
            for task_id, subscription in subscriptions.items():
                while task_id not in final:
                    try:
                        event = subscription.get_nowait()
                    except queue.Empty:
                        break
                    heard_final |= TaskStatus(event["status"]).final
            now = time.monotonic()
            if heard_final or now >= next_check:
                pending = [t for t in task_ids if t not in final]
                final |= await run_in_threadpool(_final_records, ctx, key, pending)
                if len(final) == len(task_ids):
                    return [final[t] for t in task_ids]
                next_check = now + DB_CHECK_S
                gone = await request.is_disconnected()
                if gone or now > deadline:
                    await run_in_threadpool(cancel_tasks, ctx, key, [t for t in task_ids if t not in final])
                    if gone:
                        raise TaskFailure(499, "the client closed the connection; its tasks were canceled")
                    raise TaskFailure(504, "the images were not ready in time; their tasks were canceled")
            await asyncio.sleep(POLL_S)
    finally:
        for task_id, subscription in subscriptions.items():
            events.unsubscribe(task_id, subscription)


def result_bytes(ctx: AppContext, record: TaskRecord) -> bytes:
    return ctx.service.blobs.get(record.results["original"])


def failure(record: TaskRecord) -> TaskFailure:
    """What to answer when ``record`` did not succeed."""
    if record.status is TaskStatus.EXPIRED:
        return TaskFailure(503, "the server was too busy: the task expired in the queue; retry later")
    if record.status is TaskStatus.CANCELED:
        return TaskFailure(500, "the task was canceled")
    return TaskFailure(500, f"image generation failed: {record.error or 'unknown error'}")


# Input images --------------------------------------------------------------------------------------


def open_image(data: bytes, what: str) -> Image.Image:
    """A readable input image, decoded as stored (alpha kept), or ``UserError``."""
    return decode_image(data, what, mode=None)


def _alpha(image: Image.Image) -> Image.Image | None:
    """The alpha channel, or None when the image has none."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def openai_mask(data: bytes, size: tuple[int, int] | None = None) -> bytes:
    """OpenAI's mask (a PNG, transparent where to edit) as ours: an L PNG, white = repaint."""
    image = open_image(data, "mask")
    if size is not None and image.size != size:
        mask_size, image_size = f"{image.width}x{image.height}", f"{size[0]}x{size[1]}"
        raise invalid("mask", f"the mask is {mask_size} but the image is {image_size}")
    alpha = _alpha(image)
    if alpha is None:
        raise invalid("mask", "the mask must be a PNG with an alpha channel (transparent = edit here)")
    return _png(alpha.point(lambda a: 255 if a == 0 else 0))


# Requests ------------------------------------------------------------------------------------------

DEFAULT_SIZE = (1024, 1024)
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_OPENAI_MODEL = re.compile(r"^(dall-e|gpt-image|chatgpt-image|gpt-)", re.IGNORECASE)
_NAMES = {"text": "prompt", "width": "size", "height": "size", "format": "output_format"}


def parse_size(value: str | None) -> tuple[int, int] | None:
    """``WxH`` → (w, h); None for auto or no size."""
    text = (value or "").strip().lower()
    if text in ("", "auto"):
        return None
    match = _SIZE.match(text)
    if match is None:
        raise invalid("size", f"size must be WIDTHxHEIGHT (for example 1024x1024) or auto, got {value!r}")
    return int(match[1]), int(match[2])


def model_ref(ctx: AppContext, name: str | None) -> str | None:
    """None (the server's default) for OpenAI's model names; anything else must be an imagegenx model."""
    if not name or _OPENAI_MODEL.match(name.strip()):
        return None
    from imagegenx.models.sources import resolve

    try:
        resolve(name, ctx.settings.models)
    except UserError as exc:
        raise invalid("model", str(exc)) from None
    return name.strip()


def _default_format(model: str | None) -> str:
    """OpenAI's default: GPT image models answer b64_json, DALL·E models (and no model) a URL."""
    return "b64_json" if model and model.lower().startswith(("gpt-image", "chatgpt-image")) else "url"


def _extensions(
    negative_prompt: str | None, seed: int | None, steps: int | None, output_format: str | None
) -> dict[str, Any]:
    values = {"negative_prompt": negative_prompt, "seed": seed, "steps": steps, "format": output_format}
    return {k: v for k, v in values.items() if v is not None}


def _items(ctx: AppContext, params: GenerateParams, task: str, n: int, **images: Any) -> list[TaskInput]:
    items = []
    for i in range(n):
        item = _task_input(ctx, params, task, **images)
        if params.seed is not None:
            item.params["seed"] = params.seed + i
        items.append(item)
    return items


def _answer(
    ctx: AppContext, request: Request, records: list[TaskRecord], response_format: str, created: int
) -> dict[str, Any]:
    for record in records:
        if record.status is not TaskStatus.SUCCEEDED:
            raise failure(record)
    data = []
    for record in records:
        if response_format == "url":
            url = _view(ctx, record, str(request.base_url)).urls["original"]
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


class _OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: _OpenAIErrorDetail


router = APIRouter(
    prefix="/v1",
    tags=["OpenAI Images"],
    route_class=shaped_errors(_openai_error),
    responses=error_responses(OpenAIErrorBody),
)


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``CreateImageRequest``; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, max_length=512)
    n: int | None = Field(1, ge=1, le=10)
    size: str | None = Field(None, max_length=32)
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "webp", "jpeg"] | None = None
    quality: str | None = None  # accepted, ignored
    style: str | None = None  # OpenAI's vivid/natural: accepted, ignored
    user: str | None = None  # accepted, ignored
    stream: bool | None = None
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)  # extension
    seed: int | None = Field(None, ge=0, lt=2**63)  # extension
    steps: int | None = Field(None, ge=1, le=150)  # extension


def _generation_items(ctx: AppContext, body: ImageGenerationRequest) -> list[TaskInput]:
    width, height = parse_size(body.size) or DEFAULT_SIZE
    values = {"text": body.prompt, "model": model_ref(ctx, body.model), "width": width, "height": height}
    values |= _extensions(body.negative_prompt, body.seed, body.steps, body.output_format or "png")
    params = validated(GenerateParams, values, _NAMES)
    return _items(ctx, params, "text2img", body.n or 1)


@router.post("/images/generations", summary="Create images (OpenAI Images API)")
async def generations(
    body: ImageGenerationRequest, key: KeyDep, ctx: ContextDep, request: Request
) -> dict[str, Any]:
    created = int(time.time())
    if body.stream:
        raise invalid("stream", "streaming is not supported by this server; leave stream unset")
    items = await run_in_threadpool(_generation_items, ctx, body)
    records = await run_in_threadpool(submit, ctx, key, items)
    records = await wait_for_tasks(request, ctx, key, [r.task_id for r in records])
    response_format = body.response_format or _default_format(body.model)
    return await run_in_threadpool(_answer, ctx, request, records, response_format, created)


def _edit_items(
    ctx: AppContext,
    image: bytes,
    mask: bytes | None,
    values: dict[str, Any],
    size: str | None,
    n: int,
    strength: float | None,
) -> list[TaskInput]:
    picture = open_image(image, "image")
    width, height = parse_size(size) or (max(8, picture.width // 8 * 8), max(8, picture.height // 8 * 8))
    if mask is not None:
        mask = openai_mask(mask, picture.size)
    else:
        alpha = _alpha(picture)  # DALL·E 2: without a mask, the image's own transparency is the mask
        if alpha is not None and alpha.getextrema()[0] == 0:
            mask = _png(alpha.point(lambda a: 255 if a == 0 else 0))
    values = values | {"width": width, "height": height}
    if strength is not None:
        values["strength"] = strength
    names = _NAMES | {"strength": "strength"}
    if mask is None:
        params = validated(Img2ImgParams, values, names)
        return _items(ctx, params, "img2img", n, init_image=image)
    inpaint = validated(InpaintParams, values, names)
    return _items(ctx, inpaint, "inpaint", n, init_image=image, mask_image=mask)


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
    image_data = await _read_upload(ctx, uploads[0], "image")
    mask_data = await _read_upload(ctx, mask, "mask")
    values = {"text": prompt, "model": await run_in_threadpool(model_ref, ctx, model)}
    values |= _extensions(negative_prompt, seed, steps, output_format or "png")
    items = await run_in_threadpool(_edit_items, ctx, image_data, mask_data, values, size, n, strength)
    records = await run_in_threadpool(submit, ctx, key, items)
    records = await wait_for_tasks(request, ctx, key, [r.task_id for r in records])
    response_format = response_format or _default_format(model)
    return await run_in_threadpool(_answer, ctx, request, records, response_format, created)


@router.get("/models", summary="Models this server can load (OpenAI's list shape)")
def models(key: KeyDep, ctx: ContextDep) -> dict[str, Any]:
    from imagegenx.models.sources import list_models

    found = [m.name for m in list_models(ctx.settings.models) if m.source != "refused"]
    if ctx.settings.models.default_model not in found:
        found.insert(0, ctx.settings.models.default_model)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "imagegenx"} for name in found]
    return {"object": "list", "data": data}
