"""Request bodies into task inputs: prompt filter, style, LoRAs, post-processing chain and the input
images (base64, URL or upload), each checked to decode so a bad one is a 400 now, not a failed task
later. Shared by the v1, control, portrait, OpenAI and A1111 routes."""

from __future__ import annotations

import json
import random
from pathlib import Path

from fastapi import UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from imagegenx.api import ssrf
from imagegenx.api.app import AppContext
from imagegenx.api.schemas import Envelope, GenerateParams, Img2ImgParams, Submitted, decode_base64_image
from imagegenx.api.styles import apply_style
from imagegenx.engine.service import TaskInput
from imagegenx.pipelines.samplers import parse_sampler
from imagegenx.types import TaskRecord, UserError
from imagegenx.vision.imagefile import decode_image


def build_task_input(
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
        "seed": p.seed if p.seed is not None else random.randrange(2**32),
        "clip_skip": p.clip_skip,
        "task": task,
        "strength": getattr(p, "strength", 0.75),
        "loras": loras,
        "priority": p.priority,
    }
    if p.sampler is not None:  # else the worker gives the model's own (types.default_sampler)
        params["scheduler"] = parse_sampler(p.sampler).value
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
    if p.decoder != "full":
        check_tiny_decoder(ctx)
        params["decoder"] = p.decoder
    return TaskInput(params, p.priority, p.callback_url, p.style, output_format=p.format.lower(), **images)


def check_tiny_decoder(ctx: AppContext) -> None:
    """A request for the tiny decoder is refused now where the server has none at all (a model
    family without one fails the task with the reason)."""
    if not ctx.settings.models.tiny_decoders:
        raise UserError("this server has no tiny decoder (IMAGEGENX_MODELS__TINY_DECODERS): use full")


def model_file(ctx: AppContext, name: str, suffix: str, what: str) -> Path:
    """A helper model's file by name in the model folder (a GFPGAN, ArcFace or depth model). Never a
    path: a request cannot reach other files."""
    file = name if name.endswith(suffix) else f"{name}{suffix}"
    path = ctx.settings.models.model_dir / file
    if ".." in name or "/" in name or not path.is_file():
        raise UserError(f"no {what} {file!r} in the server's model folder")
    return path


def submitted_envelope(records: list[TaskRecord], batch_id: str | None = None) -> Envelope[Submitted]:
    return Envelope(data=Submitted(task_ids=[r.task_id for r in records], batch_id=batch_id))


def input_image_bytes(
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


async def read_upload(ctx: AppContext, upload: UploadFile | None, what: str) -> bytes | None:
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


def form_params(model: type[Img2ImgParams], params: str) -> Img2ImgParams:
    try:
        return model.model_validate(json.loads(params or "{}"))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise UserError(f"params: {exc}".splitlines()[0]) from None
