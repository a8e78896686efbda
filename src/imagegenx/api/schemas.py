"""Request and response bodies of the ImageGenX v1 API and its {code, message, data} envelope."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field, field_validator

from imagegenx.types import UserError

T = TypeVar("T")

MAX_PROMPT_CHARS = 20_000


class Envelope(BaseModel, Generic[T]):
    code: int = 0
    message: str = "ok"
    data: T | None = None


class LoraWeight(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    weight: float = Field(1.0, ge=0, le=2)


class PostprocessParams(BaseModel):
    """The declared post-processing chain, run in this order: hires fix, detection, QC, refiner,
    face/hand fix, upscale, watermarks. Everything is off unless asked for."""

    hires_scale: float = Field(1.0, ge=1, le=4, description="Hires fix: the result is this much larger")
    hires_strength: float = Field(0.35, gt=0, le=1)
    hires_steps: int | None = Field(None, ge=1, le=150, description="Steps run in the second pass")
    hires_upscaler: Literal["lanczos", "realesrgan"] = "lanczos"
    qc: bool = Field(False, description="Score sharpness and NSFW probability into the metadata")
    brisque: bool = Field(False, description="Add the BRISQUE no-reference quality score to QC")
    refiner: str | None = Field(None, max_length=512, description="Refiner model for an img2img pass")
    refiner_steps: int = Field(10, ge=1, le=150)
    refiner_strength: float = Field(0.3, gt=0, le=1)
    face_fix: bool = Field(False, description="Regenerate detected faces at low denoise (ADetailer style)")
    hand_fix: bool = Field(False, description="Regenerate detected hands at low denoise")
    fix_strength: float = Field(0.4, gt=0, le=1)
    fix_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    face_restore: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="GFPGAN model: a .safetensors file's name in the server's model folder",
    )
    face_restore_weight: float = Field(0.5, ge=0, le=1)
    upscale: Literal[1, 2, 4] = Field(1, description="Real-ESRGAN upscale (4: paid tier)")
    network_strength: float = Field(0.35, ge=0, le=1, description="Share of the network in the upscale")
    unsharp: bool = True
    watermark_text: str | None = Field(None, max_length=200)
    invisible_watermark: bool = False


class GenerateParams(BaseModel):
    """Shared by every generation route. Sizes: multiples of 8, 256-2048 (tier limits apply)."""

    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The prompt")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, max_length=512, description="Default: the server's default model")
    width: int = Field(1024, ge=8, le=8192)
    height: int = Field(1024, ge=8, le=8192)
    resolution: str | None = Field(
        None, pattern=r"^\d{2,4}x\d{2,4}$", description="WxH; overrides width/height"
    )
    steps: int = Field(30, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0, le=30)
    sampler: str | None = Field(
        None,
        max_length=32,
        description="Default: the model's own (DPM++ 2M Karras; flow-matching Euler for SD 3.5 and Flux)",
    )
    seed: int | None = Field(None, ge=0, lt=2**63)
    clip_skip: int = Field(1, ge=1, le=12)
    style: str | None = Field(None, max_length=64)
    loras: list[LoraWeight] = Field(default_factory=list, max_length=8)
    lora_name: str | None = Field(None, max_length=128, description="Shorthand for one LoRA")
    lora_weight: float = Field(1.0, ge=0, le=2)
    priority: int = Field(2, ge=0, le=3, description="0 most urgent, 3 test traffic")
    format: str = Field("webp", pattern=r"^(?i:webp|png|jpe?g|avif)$")
    callback_url: str | None = Field(None, max_length=2048)
    upscale: Literal[1, 2, 4] = Field(1, description="Real-ESRGAN upscale after generation (4: paid tier)")
    watermark: str | None = Field(None, max_length=200, description="Visible text watermark")
    invisible_watermark: bool = Field(False, description="Embed an invisible watermark carrying the task id")
    postprocess: PostprocessParams | None = Field(None, description="The post-processing chain")
    embed_metadata: bool = Field(True, description="Embed the generation parameters in the image file")
    decoder: Literal["full", "tiny"] = Field(
        "full",
        description="tiny: the model family's tiny latent decoder (TAESD's kind, if the server has one): "
        "much faster, a little less fine detail",
    )

    @property
    def size(self) -> tuple[int, int]:
        if self.resolution:
            w, h = self.resolution.split("x")
            return int(w), int(h)
        return self.width, self.height


class Img2ImgParams(GenerateParams):
    image: str | None = Field(None, description="Input image, base64 (data: URLs accepted)")
    image_url: str | None = Field(None, max_length=2048)
    strength: float = Field(0.75, gt=0, le=1)


class InpaintParams(Img2ImgParams):
    mask: str | None = Field(None, description="Mask, base64: white = repaint")
    mask_url: str | None = Field(None, max_length=2048)
    strength: float = Field(1.0, gt=0, le=1)


class BatchGenerateParams(GenerateParams):
    text: str = Field("", max_length=MAX_PROMPT_CHARS, description="Unused: see texts")
    texts: list[str] = Field(min_length=1, max_length=100)
    batch_size: int = Field(1, ge=1, le=10, description="Images per text")

    @field_validator("texts")
    @classmethod
    def _texts_not_empty(cls, texts: list[str]) -> list[str]:
        if any(not t.strip() or len(t) > MAX_PROMPT_CHARS for t in texts):
            raise ValueError(f"every text must be 1-{MAX_PROMPT_CHARS} characters")
        return texts


class TaskView(BaseModel):
    task_id: str
    status: str
    progress: int
    estimated_seconds: float
    task_type: str
    model: str
    width: int
    height: int
    style: str | None
    priority: int
    attempts: int
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    batch_id: str | None
    urls: dict[str, str]
    params: dict[str, Any]
    metadata: dict[str, Any]


class Submitted(BaseModel):
    task_ids: list[str]
    batch_id: str | None = None
    status: str = "queued"


class Page(BaseModel):
    items: list[TaskView]
    total: int
    page: int
    page_size: int


def decode_base64_image(value: str, what: str, max_bytes: int) -> bytes:
    """Base64 (optionally a data: URL) → bytes, with a size cap checked before decoding."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) * 3 // 4 > max_bytes:
        raise UserError(f"{what} is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{what} is not valid base64") from None
