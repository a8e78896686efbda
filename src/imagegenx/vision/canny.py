"""Edge and depth control images for ControlNet-Canny and ControlNet-Depth.

Why these exact recipes: a ControlNet only follows images that look like its training conditions.
ControlNet-Canny was trained on lllyasviel's annotator, which is ``cv2.Canny(image, low, high)`` on the
RGB ``uint8`` image itself (OpenCV takes, per pixel, the gradient of the channel where it is strongest),
white edges on black, copied to 3 channels; diffusers' and controlnet_aux's examples do the same, with
thresholds 100 and 200. ControlNet-Depth was trained on MiDaS relative inverse depth scaled to 0-255:
near is white, far is black. Users bring their own depth map here (no depth model is bundled), so it is
only rescaled.
Both work on the CPU with OpenCV and NumPy and load no model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from imagegenx.types import UserError

__all__ = ["canny_control_image", "depth_control_image"]


def _as_uint8(image: Any) -> np.ndarray:
    """PIL image or uint8 array → HxW (grayscale) or HxWx3 (RGB) uint8 array."""
    if hasattr(image, "convert"):  # PIL
        image = image.convert("L" if image.mode in ("1", "L") else "RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"expected an HxW or HxWx3 uint8 image, got {arr.dtype} of shape {arr.shape}")
    return np.ascontiguousarray(arr if arr.ndim == 2 else arr[..., :3])


def canny_control_image(image: Any, low: int = 100, high: int = 200) -> Image.Image:
    """White Canny edges on black, RGB, the image's size: ControlNet-Canny's condition image.

    1. Convert the input to a uint8 array (grayscale stays grayscale, colour becomes RGB).
    2. ``cv2.Canny`` with hysteresis thresholds ``low`` and ``high`` (3x3 Sobel, L1 gradient).
    3. Copy the edge map to 3 channels.
    """
    import cv2

    if not 0 <= low <= high:
        raise UserError(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    edges = cv2.Canny(_as_uint8(image), low, high)
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2))


def depth_control_image(depth: Any, invert: bool = False) -> Image.Image:
    """A user's depth map → 0-255, near = white, RGB: ControlNet-Depth's condition image.

    ``depth``: a grayscale PIL image (8-bit, 16-bit or float), an RGB one (its luminance is used), or a
    2-D float or integer array. By default larger values are nearer, as in MiDaS and Depth Anything
    disparity maps and ControlNet's depth training images; pass ``invert=True`` for metric depth or a
    z-buffer, where larger values are farther. The smallest finite value becomes 0 (far), the largest
    255 (near); NaN and infinite pixels count as far.
    """
    # 1. To a float array
    if hasattr(depth, "mode"):  # PIL: keep 16-bit and float precision, anything else → luminance
        arr = np.asarray(depth if depth.mode in ("L", "I", "I;16", "F") else depth.convert("L"))
    else:
        arr = np.asarray(depth)
    arr = arr.astype(np.float64)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):  # an RGB array: its luminance, as PIL's "L"
        arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114])
    if arr.ndim != 2:
        raise UserError(f"a depth map must be one channel (HxW), got shape {arr.shape}")

    # 2. Normalise: nearest → 255
    finite = np.isfinite(arr)
    if not finite.any():
        raise UserError("the depth map has no finite values")
    if invert:
        arr = -arr
    lo, hi = arr[finite].min(), arr[finite].max()
    if hi <= lo:
        raise UserError("the depth map is flat (one value everywhere): it gives ControlNet nothing to follow")
    scaled = np.where(finite, (arr - lo) / (hi - lo), 0.0)

    # 3. 8-bit, 3 channels
    gray = np.rint(scaled * 255.0).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
