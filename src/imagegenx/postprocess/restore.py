"""GFPGAN face restoration with weights the user supplies (GFPGAN v1.3 / v1.4, as ``.safetensors``).

No registry ships GFPGAN weights (WEIGHTS.md) and the official package pulls basicsr, facexlib and
torchvision, so the default face fix regenerates faces with the image's own diffusion model
(:mod:`imagegenx.postprocess.facefix`). This module is the optional backend for a user who has the
public ``GFPGANv1.4.pth`` (or v1.3): converted to ``.safetensors`` (its ``params_ema`` dict), it runs
in our own :class:`~imagegenx.postprocess.gfpgan_arch.GFPGANv1Clean`. Pickle checkpoints are refused:
they can run code.

For every face detection of every image of the batch (the chain's one detection pass, not repeated):

1. align: the similarity transform (Umeyama) that takes BlazeFace's eyes, nose tip and mouth centre to
   facexlib's FFHQ 512 template (mouth centre = mean of its two mouth corners), then a 512×512 warp with
   facexlib's grey border;
2. restore: all crops of the batch through GFPGAN as one batch (RGB in [-1, 1], output clamped);
3. paste: the restored face warped back with the inverse transform, blended through the warped square
   eroded and blurred as facexlib does (edge width = √area / 20), times ``weight``. Only the square's
   bounding region is touched: outside it not a pixel changes, and ``weight`` 0 changes nothing.

CUDA runs fp16, the CPU fp32. Measured with random weights on the astronaut's face: on an H200, fp16
within one grey level of fp32 (61 dB), about 6 ms a face in batches of 8-32 and 34 ms for one face alone,
about 0.4 GB of activations a face (``batch_size`` caps a batch); on one CPU thread about 4.5 s a face.
Nothing is loaded at import time: :func:`get_restorer` loads a model on first use and caches it by
(path, device, dtype).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagegenx.postprocess.gfpgan_arch import GFPGANv1Clean
from imagegenx.postprocess.steps import device_and_dtype, param
from imagegenx.types import UserError
from imagegenx.vision.identity import umeyama

FACE_SIZE = 512
# facexlib's FFHQ 5-point template for 512 px: eye on the image's left, other eye, nose tip, and the mean
# of the two mouth corners (201.26117, 371.41043) and (313.08905, 371.15118).
TEMPLATE = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [(201.26117 + 313.08905) / 2, (371.41043 + 371.15118) / 2],
    ]
)
BORDER_RGB = (132, 133, 135)  # facexlib's grey outside the image, (135, 133, 132) in its BGR
MIN_EYE_DISTANCE = 5.0  # GFPGANer skips faces whose eyes are closer than this, in pixels
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")


@dataclass(frozen=True)
class AlignedFace:
    image: int  # index in the batch
    matrix: np.ndarray  # 2×3, image pixels → crop pixels (pixel centres at integers, as OpenCV)
    crop: np.ndarray  # FACE_SIZE×FACE_SIZE×3 uint8 RGB


# --------------------------------------------------------------------------------------------------
# 1. Align and 3. paste back


def face_points(keypoints: np.ndarray) -> np.ndarray:
    """BlazeFace's first four keypoints (eye on the image's left, other eye, nose tip, mouth centre),
    moved from pixel-edge coordinates to OpenCV's pixel centres."""
    pts = np.asarray(keypoints, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] < 4 or pts.shape[1] != 2:
        raise ValueError(f"a face needs BlazeFace's keypoints, (6, 2); got shape {pts.shape}")
    return pts[:4] - 0.5


def align_face(image: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 2×3 image → template matrix and the FACE_SIZE² RGB crop it gives."""
    import cv2

    matrix = umeyama(face_points(keypoints), TEMPLATE)
    crop = cv2.warpAffine(
        image,
        matrix,
        (FACE_SIZE, FACE_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=BORDER_RGB,
    )
    return matrix, crop


def align_faces(images: Sequence[np.ndarray], detections: Sequence[Sequence[Any]]) -> list[AlignedFace]:
    """Step 1 for every face detection (other kinds are skipped, and so are faces too small to restore)."""
    faces = []
    for index, (image, found) in enumerate(zip(images, detections, strict=True)):
        for det in found:
            if det.kind != "face":
                continue
            pts = face_points(det.keypoints)
            if np.hypot(*(pts[1] - pts[0])) < MIN_EYE_DISTANCE:
                continue
            matrix, crop = align_face(image, det.keypoints)
            faces.append(AlignedFace(index, matrix, crop))
    return faces


def warp_back(
    matrix: np.ndarray, restored: np.ndarray, shape: tuple[int, ...]
) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray] | None:
    """``restored`` (the FACE_SIZE² crop) warped back into an image of ``shape``: the box
    ``(x0, y0, x1, y1)`` that the crop's square covers (clipped; None when empty), the face and the
    feathered mask (float32, 0-1) over that box."""
    import cv2

    inverse = cv2.invertAffineTransform(matrix)
    # a. The square's bounding box in the image, plus a pixel of slack, clipped.
    square = np.array([[0, 0], [1, 0], [0, 1], [1, 1]]) * FACE_SIZE - 0.5  # outer pixel edges
    corners = square @ inverse[:, :2].T + inverse[:, 2]
    height, width = shape[:2]
    x0, y0 = (max(0, math.floor(v) - 1) for v in corners.min(axis=0))
    x1 = min(width, math.ceil(corners[:, 0].max()) + 2)
    y1 = min(height, math.ceil(corners[:, 1].max()) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    inverse[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    # b. Warp the face and its square back; the face replicates its edge, so no dark fringe bleeds in.
    face = cv2.warpAffine(restored, inverse, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse, size, flags=cv2.INTER_LINEAR)
    # c. Feather as facexlib: erode 2 px (the interpolated border), then by 2·edge, blur by 2·edge + 1.
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))
    edge = int(math.sqrt(float(mask.sum()))) // 20
    if edge > 0:
        mask = cv2.erode(mask, np.ones((2 * edge, 2 * edge), np.uint8))
        mask = cv2.GaussianBlur(mask, (2 * edge + 1, 2 * edge + 1), 0)
    return (x0, y0, x1, y1), face, mask


def paste_face(image: np.ndarray, matrix: np.ndarray, restored: np.ndarray, weight: float) -> np.ndarray:
    """``image`` (H×W×3 uint8) with ``restored`` blended in through the feathered mask times ``weight``."""
    out = image.copy()
    warped = warp_back(matrix, restored, image.shape) if weight > 0.0 else None
    if warped is None:
        return out
    (x0, y0, x1, y1), face, mask = warped
    # Where the mask is 0 the original pixel comes back exactly (x + 0 · d, rounded, is x).
    roi = out[y0:y1, x0:x1].astype(np.float32)
    alpha = (weight * mask)[:, :, None]
    out[y0:y1, x0:x1] = np.clip(np.rint(roi + alpha * (face.astype(np.float32) - roi)), 0, 255)
    return out


# --------------------------------------------------------------------------------------------------
# 2. The network: loading and running


def check_model_path(path: str | Path) -> Path:
    """``path`` as a Path, if it names an existing ``.safetensors`` file."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{path}: pickle checkpoints can run code and are not loaded; convert the GFPGAN weights "
            "(the 'params_ema' dict) to .safetensors"
        )
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: face restoration loads only .safetensors files")
    if not path.is_file():
        raise UserError(f"face restoration model not found: {path}")
    return path


def _mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = [
        f"{label} ({len(items)}): {', '.join(items[:3])}{', …' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if items
    ]
    return "; ".join(parts)


def load_gfpgan(path: str | Path) -> GFPGANv1Clean:
    """An fp32 CPU GFPGANv1Clean holding the weights of a ``.safetensors`` file, checked key by key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_model_path(path)
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable .safetensors file ({exc})") from exc
    with torch.device("meta"):  # no random init of 86 M parameters that are overwritten at once
        model = GFPGANv1Clean()
    problem = _mismatch(state, model.state_dict())
    if problem:
        raise UserError(f"{path} is not a GFPGANv1Clean (GFPGAN v1.3/v1.4) model: {problem}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


class GFPGANRestorer:
    """A loaded GFPGANv1Clean on one device and dtype."""

    def __init__(
        self, model: GFPGANv1Clean, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.net = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    @torch.inference_mode()
    def restore(self, crops: Sequence[np.ndarray], batch_size: int | None = None) -> list[np.ndarray]:
        """FACE_SIZE² uint8 RGB crops → restored crops; ``batch_size`` None runs them all as one batch."""
        crops = list(crops)
        if not crops:
            return []
        step = batch_size or len(crops)
        out: list[np.ndarray] = []
        for start in range(0, len(crops), step):
            x = torch.from_numpy(np.stack(crops[start : start + step])).permute(0, 3, 1, 2)
            x = x.to(device=self.device, dtype=self.dtype) / 127.5 - 1.0
            y = self.net(x)[0].float().clamp_(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)
            out.extend(y.permute(0, 2, 3, 1).cpu().numpy())
        return out


_CACHE: dict[tuple[str, str, torch.dtype], GFPGANRestorer] = {}
_CACHE_LOCK = threading.Lock()


def get_restorer(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> GFPGANRestorer:
    """The cached :class:`GFPGANRestorer` for (path, device, dtype), loaded on first use."""
    dev, dt = device_and_dtype(device, dtype)
    key = (str(check_model_path(path).resolve()), str(dev), dt)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = GFPGANRestorer(load_gfpgan(key[0]), dev, dt)
        return _CACHE[key]


# --------------------------------------------------------------------------------------------------
# The step


class FaceRestore:
    """Postprocess step: ``apply(images, detections, params)`` with params ``weight`` (0-1 blend of the
    restored face with the original, default 0.5) and optional ``batch_size`` (faces per forward;
    default all of them at once). A mapping or an object with those attributes.

    ``detections`` holds each image's :class:`~imagegenx.vision.detect.Detection` list; only faces are
    restored. Images without faces (or with ``weight`` 0) come back as they are, and then no model is
    loaded.
    """

    def __init__(
        self,
        model_path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model_path = check_model_path(model_path)
        self.device = device
        self.dtype = dtype

    def apply(
        self, images: Sequence[Image.Image], detections: Sequence[Sequence[Any]], params: Any = None
    ) -> list[Image.Image]:
        # 1. Check inputs.
        images = list(images)
        if len(detections) != len(images):
            raise ValueError(f"{len(images)} images but {len(detections)} detection lists")
        weight = float(param(params, "weight", 0.5))
        if not 0.0 <= weight <= 1.0:
            raise UserError(f"face restore weight must lie in [0, 1], got {weight}")
        batch_size = param(params, "batch_size", None)
        if weight == 0.0:
            return images

        # 2. Align every face of every image.
        arrays = [np.asarray(image.convert("RGB")) for image in images]
        faces = align_faces(arrays, detections)
        if not faces:
            return images

        # 3. Restore all faces as one batch.
        restorer = get_restorer(self.model_path, self.device, self.dtype)
        restored = restorer.restore([face.crop for face in faces], int(batch_size) if batch_size else None)

        # 4. Paste back, face by face, and keep any alpha channel.
        for face, patch in zip(faces, restored, strict=True):
            arrays[face.image] = paste_face(arrays[face.image], face.matrix, patch, weight)
        touched = {face.image for face in faces}
        out = []
        for i, image in enumerate(images):
            if i not in touched:
                out.append(image)
                continue
            result = Image.fromarray(arrays[i])
            if "A" in image.getbands():
                result = result.convert("RGBA")
                result.putalpha(image.getchannel("A"))
            out.append(result)
        return out
