"""Control images for ControlNet from what a user gives: a photo (pose, edges) or a depth map."""

from __future__ import annotations

from PIL import Image

from imagegenx.types import UserError

CONTROL_TYPES = ("openpose", "canny", "depth", "none")
DEFAULT_STRENGTH = {"openpose": 0.45, "canny": 1.0, "depth": 1.0, "none": 1.0}  # seed 000: pose 0.4-0.5


def make_control_image(
    kind: str, image: Image.Image, low: int = 100, high: int = 200, depth_model: str | None = None
) -> Image.Image:
    """``openpose``: the person's pose drawn as an OpenPose skeleton; ``canny``: edges (thresholds
    ``low``/``high``); ``depth``: the image read as a depth map, near = bright, or, with
    ``depth_model`` (a user's ONNX depth model), a photo whose depth the model estimates; ``none``:
    as given."""
    if kind == "openpose":
        from imagegenx.vision.pose import pose_control_image

        return pose_control_image(image.convert("RGB"))
    if kind == "canny":
        from imagegenx.vision.canny import canny_control_image

        return canny_control_image(image.convert("RGB"), low, high)
    if kind == "depth":
        from imagegenx.vision.canny import depth_control_image

        if depth_model is not None:
            from imagegenx.vision.depth import DepthOnnx

            return depth_control_image(DepthOnnx(depth_model).estimate(image))
        return depth_control_image(image)  # keeps 16-bit and float depth precision
    if kind == "none":
        return image.convert("RGB")
    raise UserError(f"unknown control type {kind!r}; choose one of: {', '.join(CONTROL_TYPES)}")
