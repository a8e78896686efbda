"""``POST /api/v1/image/controlnet``: text to image guided by ControlNets.

Each control names its ControlNet model, gives an image and says what the image is: ``openpose``
(a photo: the person's pose is detected with mediapipe's pose model and drawn as an OpenPose
skeleton), ``canny`` (a photo: its Canny edges), ``depth`` (a depth map, near = bright) or ``none``
(already a control image). The control image is made here, on the API node's CPU, and stored with
the task like any other input; the engine only sees finished control images.
"""

from __future__ import annotations

import io
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from imagegenx.api.app import ErrorBody, error_responses
from imagegenx.api.deps import ContextDep, KeyDep
from imagegenx.api.schemas import Envelope, GenerateParams, Submitted
from imagegenx.api.task_inputs import build_task_input, input_image_bytes, model_file, submitted_envelope
from imagegenx.vision.controls import DEFAULT_STRENGTH, make_control_image
from imagegenx.vision.imagefile import decode_image

router = APIRouter(prefix="/api/v1", tags=["imagegenx v1"], responses=error_responses(ErrorBody))

MAX_CONTROL_PIXELS = 4096 * 4096


class ControlInput(BaseModel):
    type: Literal["openpose", "canny", "depth", "none"] = Field(description="What the image is")
    model: str = Field(min_length=1, max_length=512, description="ControlNet: a folder in the model folder")
    image: str | None = Field(None, description="The image, base64 (data: URLs accepted)")
    image_url: str | None = Field(None, max_length=2048)
    strength: float | None = Field(None, ge=0, le=2, description="Default: 0.45 for openpose, else 1")
    low_threshold: int = Field(100, ge=0, le=255, description="Canny's lower threshold")
    high_threshold: int = Field(200, ge=0, le=255, description="Canny's upper threshold")
    depth_model: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="depth only: an ONNX depth model by name in the model folder; the image is then a photo",
    )


class ControlNetParams(GenerateParams):
    controls: list[ControlInput] = Field(min_length=1, max_length=4)


def control_image(control: ControlInput, data: bytes, depth_model: str | None = None) -> bytes:
    """The control image the ControlNet sees, as PNG bytes."""
    image = decode_image(data, f"the {control.type} image", mode=None)  # 16-bit depth keeps its precision
    image = make_control_image(
        control.type, image, control.low_threshold, control.high_threshold, depth_model
    )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@router.post(
    "/image/controlnet",
    summary="ControlNet: a pose, edges or a depth map guide the image",
    response_model=Envelope[Submitted],
)
def controlnet(body: ControlNetParams, key: KeyDep, ctx: ContextDep) -> Envelope[Submitted]:
    images = []
    for c in body.controls:
        depth = str(model_file(ctx, c.depth_model, ".onnx", "depth model")) if c.depth_model else None
        images.append(
            control_image(c, input_image_bytes(ctx, c.image, c.image_url, f"{c.type} image"), depth)
        )
    item = build_task_input(ctx, body, "text2img")
    item.params["controls"] = [
        {
            "model": c.model,
            "type": c.type,
            "strength": c.strength if c.strength is not None else DEFAULT_STRENGTH[c.type],
        }
        for c in body.controls
    ]
    item.control_images = images
    return submitted_envelope(ctx.service.submit(key, [item]))
