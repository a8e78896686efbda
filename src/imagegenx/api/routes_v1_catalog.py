"""The ImageGenX v1 routes that list what requests can name (models, LoRAs, style presets) and take
a LoRA upload from a paid key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from fastapi.concurrency import run_in_threadpool

from imagegenx.api.app import ErrorBody, error_responses
from imagegenx.api.deps import ContextDep, KeyDep
from imagegenx.api.schemas import Envelope
from imagegenx.api.styles import STYLES
from imagegenx.engine.service import Forbidden
from imagegenx.types import Tier, UserError

router = APIRouter(prefix="/api/v1", tags=["imagegenx v1"], responses=error_responses(ErrorBody))


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
