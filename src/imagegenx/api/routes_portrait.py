"""``POST /api/v1/portrait``: 1-3 selfies in, the best of N identity portraits out (seed 000).

One task runs every stage (selfies, drafts, QC, refine, face fix, upscale, write); follow it with
``GET /api/v1/image/task/{id}`` or its ``/events`` (progress with the stage's name). Its results:
``rank1`` ... (the shortlist, best first; ``original`` is rank1), ``report`` (every draft's scores)
and ``contact_sheet``.
"""

from __future__ import annotations

import random
from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from imagegenx.api.app import ErrorBody, error_responses
from imagegenx.api.deps import ContextDep, KeyDep
from imagegenx.api.schemas import MAX_PROMPT_CHARS, Envelope, Submitted, decode_base64_image
from imagegenx.api.task_inputs import check_tiny_decoder, model_file, submitted_envelope
from imagegenx.engine.portrait_task import submit_portrait
from imagegenx.vision.selfie import RANDOM_ARCFACE

router = APIRouter(prefix="/api/v1", tags=["imagegenx v1"], responses=error_responses(ErrorBody))


class PortraitParams(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    selfies: list[str] = Field(min_length=1, max_length=3, description="1-3 photos of one person, base64")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    n: int = Field(100, ge=1, le=200, description="Drafts to make (seed 000: 100)")
    seed: int | None = Field(None, ge=0, lt=2**63)
    model: str | None = Field(None, max_length=512)
    width: int | None = Field(None, ge=64, le=2048)
    height: int | None = Field(None, ge=64, le=2048)
    steps: int = Field(4, ge=1, le=50, description="Draft steps (LCM)")
    cfg: float = Field(6.5, ge=0, le=30)
    lcm2: bool = Field(False, description="2 LCM steps with CFG 0.5 lower (seed 000 §6)")
    shortlist: int = Field(15, ge=1, le=50)
    refine_top: int = Field(10, ge=0, le=50)
    refiner: str | None = Field(None, max_length=512)
    face_fix: bool = True
    upscale: int = Field(4, description="1, 2 or 4 (4: paid tier)")
    format: str = Field("webp", pattern=r"^(?i:webp|jpe?g|png)$")
    instantid: str | None = Field(None, max_length=512, description="InstantID adapter (your weights)")
    identitynet: str | None = Field(None, max_length=512, description="IdentityNet ControlNet")
    identity_scale: float = Field(1.0, ge=0, le=2)
    arcface: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$",
        description="ArcFace .onnx (InsightFace format) by name in the server's model folder",
    )
    draft_decoder: Literal["full", "tiny"] = Field(
        "full", description="tiny: drafts decoded by the server's tiny decoder (faster, a little less detail)"
    )
    priority: int = Field(2, ge=0, le=3)


@router.post("/portrait", summary="Identity portraits from 1-3 selfies", response_model=Envelope[Submitted])
async def portrait(body: PortraitParams, key: KeyDep, ctx: ContextDep) -> Envelope[Submitted]:
    limit = ctx.settings.service.max_upload_bytes
    selfies = [
        (f"selfie{i + 1}", decode_base64_image(b64, f"selfie {i + 1}", limit))
        for i, b64 in enumerate(body.selfies)
    ]
    params = body.model_dump(exclude={"selfies", "priority", "format"}, exclude_none=True)
    params |= {
        "image_format": body.format.lower(),
        "seed": body.seed if body.seed is not None else random.randrange(2**32),
    }
    if body.arcface and body.arcface != RANDOM_ARCFACE:
        params["arcface"] = str(model_file(ctx, body.arcface, ".onnx", "ArcFace model"))
    if ctx.prompt_filter is not None:
        ctx.prompt_filter.enforce(body.prompt)
    if body.draft_decoder != "full":
        check_tiny_decoder(ctx)
    record = await run_in_threadpool(submit_portrait, ctx.service, key, selfies, params, body.priority)
    return submitted_envelope([record])
