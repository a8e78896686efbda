"""Face and hand detection in one pass with mediapipe 0.10.21's bundled TFLite models, without mediapipe.

Why not ``import mediapipe``: 0.10.21 declares ``numpy<2`` and ``protobuf<5``, which fight the rest of the
stack (WEIGHTS.md). Its model files are plain TFLite, so they run through ``ai-edge-litert`` and this
module re-implements the graphs' pre- and post-processing, option for option, from mediapipe's own
``face_detection_{short,full}_range.pbtxt`` (via ``face_detection.pbtxt``), ``palm_detection_cpu.pbtxt``
and ``palm_detection_detection_to_roi.pbtxt``:

- ImageToTensor with ``keep_aspect_ratio``: the whole image, centred and zero-padded to a square,
  bilinearly resized to the tensor (128 or 192 px); values mapped to [-1, 1] (faces) or [0, 1] (palms).
- SsdAnchors with ``fixed_anchor_size``: anchor centres on one grid per distinct stride, width and
  height 1, so decoding is ``raw / tensor_size + anchor_centre`` for centres and keypoints.
- TensorsToDetections: ``sigmoid(clip(score, ±100)) >= threshold``.
- NonMaxSuppression ``WEIGHTED``, IoU > 0.3: overlapping boxes and keypoints are averaged by score;
  the cluster keeps its best score.
- Hands only (hand_landmark_tracking's PalmDetectionDetectionToRoi): the palm box is rotated so the
  wrist → middle-finger-MCP line (palm keypoints 0 → 2) points up, shifted by half its height towards
  the fingers, squared on its long side and scaled 2.6x. Its axis-aligned bounds are the hand box.

Checked against mediapipe 0.10.21 itself on scikit-image photos: short-range faces identical, full-range
faces within 2 px (likely different kernels for the sparse model), palms and hand rects within 0.3 px.

Nothing is downloaded at run time: ``pip install --no-deps mediapipe==0.10.21`` puts them in
site-packages and :func:`mediapipe_models_dir` finds them without importing mediapipe. Interpreters
load lazily on first use, once per process; importing this module loads neither cv2 nor the runtime.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imagegenx.types import UserError

__all__ = [
    "Detection",
    "MediapipeDetector",
    "hand_box_from_palm",
    "mediapipe_models_dir",
    "ssd_anchor_centres",
]

MISSING_MODELS = (
    "face and hand detection needs mediapipe 0.10.21's model files: pip install --no-deps mediapipe==0.10.21"
)


@dataclass(frozen=True)
class Detection:
    """One face or hand.

    ``box`` is ``(left, top, right, bottom)`` in pixel edges, clipped to the image, so
    ``image[top:bottom, left:right]`` is the region. ``keypoints`` are (K, 2) ``(x, y)`` pixels (not
    clipped): for a face BlazeFace's 6 points, the subject's right eye, left eye, nose tip, mouth centre,
    right ear tragion, left ear tragion (so point 0 is on the image's left in a frontal photo); for a
    hand the 7 palm points, 0 the wrist centre and 2 the middle finger's MCP joint.
    """

    kind: str
    box: tuple[int, int, int, int]
    score: float
    keypoints: np.ndarray


@dataclass(frozen=True)
class _SsdSpec:
    """What one graph says about its model: file, square input size, anchors, keypoints, input range."""

    file: str
    size: int
    strides: tuple[int, ...]
    anchors_per_layer: int  # aspect ratio 1.0, plus one interpolated-scale anchor when that ratio is > 0
    keypoints: int
    value_range: tuple[float, float]


_FACE_SHORT = _SsdSpec(
    "face_detection/face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2, 6, (-1, 1)
)
_FACE_FULL = _SsdSpec("face_detection/face_detection_full_range_sparse.tflite", 192, (4,), 1, 6, (-1, 1))
_PALM = _SsdSpec("palm_detection/palm_detection_full.tflite", 192, (8, 16, 16, 16), 2, 7, (0, 1))
_FACE_SPECS = {"short": _FACE_SHORT, "full": _FACE_FULL}
_NMS_IOU = 0.3
# palm_detection_detection_to_roi.pbtxt: RectTransformationCalculator options.
_HAND_SCALE, _HAND_SHIFT_Y = 2.6, -0.5


def mediapipe_models_dir() -> Path:
    """``site-packages/mediapipe/modules``, found without importing mediapipe (its deps are not installed)."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(MISSING_MODELS)
    return Path(next(iter(spec.submodule_search_locations))) / "modules"


def ssd_anchor_centres(spec: _SsdSpec) -> np.ndarray:
    """(N, 2) anchor centres in [0, 1], in the model's output order (SsdAnchorsCalculator, fixed size).

    Consecutive layers with the same stride share one feature map: their anchors are emitted together
    per cell, row by row.
    """
    out, i = [], 0
    while i < len(spec.strides):
        j = i
        while j < len(spec.strides) and spec.strides[j] == spec.strides[i]:
            j += 1
        grid = math.ceil(spec.size / spec.strides[i])
        ys, xs = np.mgrid[0:grid, 0:grid]
        centres = np.stack([(xs + 0.5) / grid, (ys + 0.5) / grid], axis=-1).reshape(-1, 1, 2)
        out.append(np.repeat(centres, (j - i) * spec.anchors_per_layer, axis=1).reshape(-1, 2))
        i = j
    return np.concatenate(out).astype(np.float32)


class _Model:
    """One TFLite interpreter with its anchors; calls are serialised (interpreters are not thread-safe)."""

    def __init__(self, path: Path, spec: _SsdSpec) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.spec = spec
        # One thread: the models are small (about 2-10 ms) and workers run several things at once.
        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        outputs = {int(d["shape"][-1]): d["index"] for d in self.interpreter.get_output_details()}
        self.boxes, self.scores = outputs[4 + 2 * spec.keypoints], outputs[1]
        self.anchors = ssd_anchor_centres(spec)
        self.lock = threading.Lock()

    def __call__(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            self.interpreter.set_tensor(self.input, tensor[None])
            self.interpreter.invoke()
            raw_boxes = self.interpreter.get_tensor(self.boxes)[0].copy()
            raw_scores = self.interpreter.get_tensor(self.scores)[0, :, 0].copy()
        return raw_boxes, raw_scores


@functools.cache
def _load(path: Path, spec: _SsdSpec) -> _Model:
    return _Model(path, spec)


def _model(spec: _SsdSpec) -> _Model:
    path = mediapipe_models_dir() / spec.file
    if not path.is_file():
        raise UserError(MISSING_MODELS)
    return _load(path, spec)


def _as_rgb(image: Any) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {arr.dtype} of shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3])


def _letterbox(rgb: np.ndarray, spec: _SsdSpec) -> tuple[np.ndarray, float, float, float]:
    """Input tensor, and the square (x0, y0, side) in image pixels that the tensor covers."""
    import cv2

    h, w = rgb.shape[:2]
    side = float(max(h, w))
    x0, y0 = (w - side) / 2, (h - side) / 2
    s = spec.size / side
    m = np.array([[s, 0, -x0 * s], [0, s, -y0 * s]])
    # uint8 warp with zero borders, then the value mapping: what mediapipe's OpenCV converter does.
    warped = cv2.warpAffine(rgb, m, (spec.size, spec.size), flags=cv2.INTER_LINEAR, borderValue=0)
    lo, hi = spec.value_range
    return warped.astype(np.float32) * ((hi - lo) / 255.0) + lo, x0, y0, side


def _weighted_nms(boxes: np.ndarray, kps: np.ndarray, scores: np.ndarray) -> list[tuple]:
    """mediapipe's WEIGHTED non-max suppression: average each cluster (IoU > 0.3 with its best box)."""
    order = list(np.argsort(-scores, kind="stable"))
    out = []
    while order:
        idx = np.array(order)
        top = boxes[idx[0]]
        lt = np.maximum(boxes[idx, :2], top[:2])
        rb = np.minimum(boxes[idx, 2:], top[2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        areas = np.prod(boxes[idx, 2:] - boxes[idx, :2], axis=1)
        union = areas + areas[0] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        cluster = iou > _NMS_IOU
        cluster[0] = True  # a degenerate (zero-area) box must still leave the queue
        w = scores[idx[cluster]][:, None]
        box = (boxes[idx[cluster]] * w).sum(0) / w.sum()
        kp = (kps[idx[cluster]] * w[:, :, None]).sum(0) / w.sum()
        out.append((box, kp, float(scores[idx[0]])))
        order = [i for i, c in zip(order, cluster, strict=True) if not c]
    return out


def hand_box_from_palm(box: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Palm box (left, top, right, bottom) and 7 palm keypoints, in pixels → the hand's rotated square
    (4, 2) corners in pixels, as hand_landmark_tracking's palm → ROI step builds it."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = box[2] - box[0], box[3] - box[1]
    (x0, y0), (x1, y1) = keypoints[0], keypoints[2]
    # DetectionsToRects: rotate so that wrist → middle MCP points up (target angle 90°); image y is down.
    rot = math.pi / 2 - math.atan2(-(y1 - y0), x1 - x0)
    rot -= 2 * math.pi * math.floor((rot + math.pi) / (2 * math.pi))
    cos, sin = math.cos(rot), math.sin(rot)
    # RectTransformation: shift by shift_y * height along the rect's own y axis, square long, scale.
    cx, cy = cx - h * _HAND_SHIFT_Y * sin, cy + h * _HAND_SHIFT_Y * cos
    half = max(w, h) * _HAND_SCALE / 2
    local = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    return local @ np.array([[cos, sin], [-sin, cos]]) + [cx, cy]


def _clip_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    left, top, right, bottom = (round(float(v)) for v in box)
    return (
        min(max(left, 0), width),
        min(max(top, 0), height),
        min(max(right, 0), width),
        min(max(bottom, 0), height),
    )


def _ssd_detect(rgb: np.ndarray, spec: _SsdSpec, threshold: float) -> list[tuple]:
    """One SSD model on the whole image → ``[(box, keypoints, score)]`` in image pixels, best score first."""
    model = _model(spec)
    tensor, x0, y0, side = _letterbox(rgb, spec)
    raw_boxes, raw_scores = model(tensor)
    scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores.astype(np.float64), -100.0, 100.0)))
    keep = np.flatnonzero(scores >= threshold)
    reg = raw_boxes[keep] / spec.size
    anchors = model.anchors[keep]
    centre, size = reg[:, :2] + anchors, reg[:, 2:4]
    kps = reg[:, 4 : 4 + 2 * spec.keypoints].reshape(len(keep), spec.keypoints, 2) + anchors[:, None, :]
    valid = (size >= 0).all(axis=1)  # TensorsToDetections drops boxes of negative size
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)[valid]
    # Tensor [0, 1] → image pixels: undo the letterbox (same scale on both axes, so after NMS).
    return [
        (box * side + [x0, y0, x0, y0], kp * side + [x0, y0], score)
        for box, kp, score in _weighted_nms(boxes, kps[valid], scores[keep][valid])
    ]


class MediapipeDetector:
    """Faces (BlazeFace short or full range) and hands (palm detection + hand rect) in RGB images, on CPU.

    ``face_range``: ``"short"`` is the 128 px selfie model, for faces that fill a good part of the frame;
    ``"full"`` (192 px input, one anchor per 4 px cell) also finds small faces. Both find the astronaut
    and the cameraman in scikit-image's photos, but when the astronaut is shrunk so that her face is
    30-60 px wide in a 512 px image only full range still finds it (short range's smallest boxes are
    about 75 px there). Small faces in full-body renders are what a face fix is most needed for, so
    full range is the default. Thresholds are the detectors'
    minimum confidences (mediapipe's ``min_detection_confidence``, default 0.5).
    """

    def __init__(
        self, face_threshold: float = 0.5, hand_threshold: float = 0.5, face_range: str = "full"
    ) -> None:
        if face_range not in _FACE_SPECS:
            raise UserError(f"face_range must be 'short' or 'full', not {face_range!r}")
        self.face_threshold = face_threshold
        self.hand_threshold = hand_threshold
        self.face_range = face_range

    def detect(self, image: Any) -> list[Detection]:
        """Faces, then hands, each best score first, in an HxWx3 uint8 RGB array or a PIL image.

        1. Convert the input to a contiguous RGB uint8 array.
        2. Faces: letterbox to the face model's square input in [-1, 1], run it, decode the scores and
           the anchor-relative boxes and 6 keypoints, weighted NMS, undo the letterbox.
        3. Palms: the same with the palm model (input in [0, 1], 7 keypoints).
        4. Each palm → the hand's rotated square (:func:`hand_box_from_palm`) → its axis-aligned box.
        5. Clip boxes to the image and sort each kind by score.
        """
        rgb = _as_rgb(image)
        h, w = rgb.shape[:2]
        found = [
            Detection("face", _clip_box(box, w, h), score, kp)
            for box, kp, score in _ssd_detect(rgb, _FACE_SPECS[self.face_range], self.face_threshold)
        ]
        hands = []
        for box, kp, score in _ssd_detect(rgb, _PALM, self.hand_threshold):
            corners = hand_box_from_palm(box, kp)
            aabb = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
            hands.append(Detection("hand", _clip_box(aabb, w, h), score, kp))
        found.sort(key=lambda d: -d.score)
        hands.sort(key=lambda d: -d.score)
        return found + hands

    def detect_batch(self, images: Any) -> list[list[Detection]]:
        """:meth:`detect` per image (the models take one image per call; each call is a few ms)."""
        return [self.detect(image) for image in images]
