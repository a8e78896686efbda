"""The OpenAI Images API's request and error bodies, and their translation into our tasks.

Sizes, model names, the extension fields and OpenAI's masks (transparent = edit here) become
``GenerateParams`` / ``Img2ImgParams`` / ``InpaintParams`` and one ``TaskInput`` per image.
"""

from __future__ import annotations

import io
import re
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from imagegenx.api.app import AppContext
from imagegenx.api.schemas import MAX_PROMPT_CHARS, GenerateParams, Img2ImgParams, InpaintParams
from imagegenx.api.shaped_errors import invalid, validated
from imagegenx.api.task_inputs import build_task_input
from imagegenx.engine.service import TaskInput
from imagegenx.types import UserError
from imagegenx.vision.imagefile import decode_image

# Bodies --------------------------------------------------------------------------------------------


class _OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: _OpenAIErrorDetail


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


# Fields → tasks ------------------------------------------------------------------------------------

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


def default_format(model: str | None) -> str:
    """OpenAI's default: GPT image models answer b64_json, DALL·E models (and no model) a URL."""
    return "b64_json" if model and model.lower().startswith(("gpt-image", "chatgpt-image")) else "url"


def extensions(
    negative_prompt: str | None, seed: int | None, steps: int | None, output_format: str | None
) -> dict[str, Any]:
    """Our extension fields and the output format, as params values (unset ones left out)."""
    values = {"negative_prompt": negative_prompt, "seed": seed, "steps": steps, "format": output_format}
    return {k: v for k, v in values.items() if v is not None}


def _items(ctx: AppContext, params: GenerateParams, task: str, n: int, **images: Any) -> list[TaskInput]:
    items = []
    for i in range(n):
        item = build_task_input(ctx, params, task, **images)
        if params.seed is not None:
            item.params["seed"] = params.seed + i
        items.append(item)
    return items


def generation_items(ctx: AppContext, body: ImageGenerationRequest) -> list[TaskInput]:
    """The tasks of a ``/images/generations`` request, one per image."""
    width, height = parse_size(body.size) or DEFAULT_SIZE
    values = {"text": body.prompt, "model": model_ref(ctx, body.model), "width": width, "height": height}
    values |= extensions(body.negative_prompt, body.seed, body.steps, body.output_format or "png")
    params = validated(GenerateParams, values, _NAMES)
    return _items(ctx, params, "text2img", body.n or 1)


def edit_items(
    ctx: AppContext,
    image: bytes,
    mask: bytes | None,
    values: dict[str, Any],
    size: str | None,
    n: int,
    strength: float | None,
) -> list[TaskInput]:
    """The tasks of an ``/images/edits`` request: img2img, or inpaint where there is a mask."""
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
