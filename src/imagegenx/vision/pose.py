"""Body pose → OpenPose skeleton image for ControlNet-OpenPose, with mediapipe 0.10.21's BlazePose models.

Why BlazePose and not OpenPose's own network: the OpenPose body model (``body_pose_model.pth``) is a
pickle checkpoint under a non-commercial licence; mediapipe's pose models are Apache-2.0 and already
installed for face and hand detection (WEIGHTS.md). They run through ``ai-edge-litert`` like
:mod:`imagegenx.vision.detect`, whose SSD decoding (letterbox, anchors, sigmoid, weighted NMS) is reused;
the two-stage graph is re-implemented from mediapipe's ``pose_landmark_cpu.pbtxt`` with
``static_image_mode=True`` (``pose_detection_cpu``, ``pose_detection_to_roi``,
``pose_landmark_by_roi_cpu``, ``tensors_to_pose_landmarks_and_segmentation``):

- Person detector ``pose_detection.tflite``: 224 px letterbox in [-1, 1], 2254 anchors (strides 8, 16,
  32, 32, 32, two per cell), 4 keypoints: mid-hip, a point whose distance from the mid-hip is half the
  body's size and whose direction is the body's "up", then the same two for the upper body.
- ROI (AlignmentPointsRectsCalculator + RectTransformation): a square centred on the mid-hip, side
  2 x |kp1 - kp0| x 1.25, rotated so that kp0 → kp1 points up. It often reaches far outside the image
  (a waist-up photo puts the hips near the bottom edge); the crop replicates the border.
- Landmarks ``pose_landmark_full.tflite`` (model_complexity 1, the only one bundled; lite and heavy are
  downloaded by mediapipe at run time): 256 px crop of the ROI in [0, 1]; a pose-presence score
  (gated at 0.5, mediapipe's ``min_tracking_confidence``); 39 points of (x, y, z, visibility, presence),
  sigmoids on the last two; x and y refined by a 7x7 window of the 64x64 heatmaps; projected back.

mediapipe's legacy pose is single-person: the best detection is the one person, as in ``mp.solutions``.
Checked against mediapipe 0.10.21 itself on scikit-image photos (tests/test_control_images.py): detector
scores within 0.005 and keypoints within 1.3 px, the ROI formula exact, face and shoulder landmarks
within 1.5 px end to end. A point whose heatmap peak sits near the refinement threshold (0.5) can fall on
the other side of it and move by several pixels (the cameraman's fingers: up to 25).

The 33 BlazePose landmarks become OpenPose's 18 COCO keypoints (neck = mid-shoulders; BlazePose has no
neck) and :func:`draw_openpose` draws them as controlnet_aux's ``draw_bodypose`` does, the image
ControlNet-OpenPose was trained on. Models load lazily, once per process.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imagegenx.types import UserError
from imagegenx.vision.detect import _as_rgb, _ssd_detect, _SsdSpec, mediapipe_models_dir

__all__ = [
    "BLAZEPOSE_TO_OPENPOSE",
    "OPENPOSE_KEYPOINTS",
    "Pose",
    "PoseDetector",
    "draw_openpose",
    "pose_control_image",
]

MISSING_MODELS = (
    "pose detection needs mediapipe 0.10.21's model files: pip install --no-deps mediapipe==0.10.21"
)
NO_PERSON = "no person found in the pose image"

_DETECTOR = _SsdSpec("pose_detection/pose_detection.tflite", 224, (8, 16, 32, 32, 32), 2, 4, (-1, 1))
_LANDMARK_FILE = "pose_landmark/pose_landmark_full.tflite"
_LANDMARK_SIZE = 256
_ROI_SCALE = 1.25  # pose_detection_to_roi.pbtxt
_HEATMAP_KERNEL, _HEATMAP_MIN_CONFIDENCE = 7, 0.5  # RefineLandmarksFromHeatmapCalculator options
_BLAZEPOSE_POINTS = 33  # of the model's 39: the rest track the ROI between video frames or are unused

OPENPOSE_KEYPOINTS = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
# BlazePose landmark index for each OpenPose keypoint; the neck (None) is the shoulders' midpoint.
BLAZEPOSE_TO_OPENPOSE = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
# controlnet_aux draw_bodypose: limbs as 1-based keypoint pairs, and one colour per limb and keypoint (RGB).
_LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
    (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)  # fmt: skip
_COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
_STICK_WIDTH, _JOINT_RADIUS, _LIMB_OPACITY = 4, 4, 0.6


@dataclass(frozen=True)
class Pose:
    """One person.

    ``keypoints``: (18, 2) ``(x, y)`` pixels in :data:`OPENPOSE_KEYPOINTS` order, NaN where a point is
    missing (visibility or presence below the detector's ``keypoint_threshold``, or outside the image).
    "Right" is the person's right: on the image's left when they face the camera. ``score``: the person
    detector's confidence. ``landmarks``: the 33 BlazePose landmarks as (x px, y px, z, visibility,
    presence); z is depth relative to the hips, in the same scale as x (smaller = nearer the camera).
    """

    keypoints: np.ndarray
    score: float
    landmarks: np.ndarray


class _Landmarker:
    """The landmark model's interpreter; calls are serialised (interpreters are not thread-safe)."""

    def __init__(self, path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        # Outputs by shape: landmarks (1, 195), pose flag (1, 1), heatmap (1, 64, 64, 39); the
        # segmentation mask and world landmarks are not used.
        by_shape = {tuple(d["shape"]): d["index"] for d in self.interpreter.get_output_details()}
        self.landmarks, self.flag = by_shape[(1, 195)], by_shape[(1, 1)]
        self.heatmap = by_shape[(1, 64, 64, 39)]
        self.lock = threading.Lock()

    def __call__(self, tensor: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        with self.lock:
            self.interpreter.set_tensor(self.input, tensor[None])
            self.interpreter.invoke()
            raw = self.interpreter.get_tensor(self.landmarks)[0].reshape(39, 5).copy()
            flag = float(self.interpreter.get_tensor(self.flag)[0, 0])
            heatmap = self.interpreter.get_tensor(self.heatmap)[0].copy()
        return raw, flag, heatmap


@functools.cache
def _load_landmarker(path: Path) -> _Landmarker:
    return _Landmarker(path)


def _models_present() -> None:
    root = mediapipe_models_dir()
    if not ((root / _DETECTOR.file).is_file() and (root / _LANDMARK_FILE).is_file()):
        raise UserError(MISSING_MODELS)


def pose_roi(mid_hip: np.ndarray, scale_point: np.ndarray) -> tuple[float, float, float, float]:
    """Detector keypoints 0 and 1 (pixels) → the landmark model's square ROI ``(cx, cy, side, rotation)``.

    Rotation is in radians, clockwise on screen, 0 when the body is upright (mediapipe's NormalizedRect).
    """
    (x0, y0), (x1, y1) = mid_hip, scale_point
    side = 2.0 * math.hypot(x1 - x0, y1 - y0) * _ROI_SCALE
    # DetectionsToRects: target angle 90°, image y points down; normalised to [-pi, pi).
    rot = math.pi / 2 - math.atan2(-(y1 - y0), x1 - x0)
    rot -= 2 * math.pi * math.floor((rot + math.pi) / (2 * math.pi))
    return float(x0), float(y0), side, rot


def _roi_matrix(roi: tuple[float, float, float, float], size: int) -> np.ndarray:
    """2x3 affine map from tensor pixels (0..size) to image pixels for a rotated square ROI."""
    cx, cy, side, rot = roi
    c, s, k, h = math.cos(rot), math.sin(rot), side / size, side / 2
    return np.array([[c * k, -s * k, cx - h * (c - s)], [s * k, c * k, cy - h * (s + c)]])


def _refine_from_heatmap(xy: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """RefineLandmarksFromHeatmapCalculator: each point (tensor-normalised) → the sigmoid-weighted mean cell
    index of a 7x7 heatmap window around it, if that window's peak is at least 0.5. Quirks kept: the
    mean uses cell indices (not centres), the row is not bounds-checked, coordinates truncate to int."""
    hm_h, hm_w = heatmap.shape[:2]
    out = xy.copy()
    half = (_HEATMAP_KERNEL - 1) // 2
    for i, (x, y) in enumerate(xy):
        col, row = int(x * hm_w), int(y * hm_h)
        if col < 0 or col >= hm_w or row < 0:
            continue
        rows = slice(max(0, row - half), min(hm_h, row + half + 1))
        cols = slice(max(0, col - half), min(hm_w, col + half + 1))
        window = heatmap[rows, cols, i].astype(np.float32)
        if window.size == 0:
            continue
        conf = 1.0 / (1.0 + np.exp(-window))
        total = conf.sum()
        if conf.max() >= _HEATMAP_MIN_CONFIDENCE and total > 0:
            r, c = np.mgrid[rows, cols]
            out[i] = ((c * conf).sum() / hm_w / total, (r * conf).sum() / hm_h / total)
    return out


def _to_openpose(landmarks: np.ndarray, width: int, height: int, threshold: float) -> np.ndarray:
    """33 BlazePose landmarks → (18, 2) OpenPose keypoints, NaN where unseen or off the image."""
    xy, vis, presence = landmarks[:, :2], landmarks[:, 3], landmarks[:, 4]
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    seen = (vis >= threshold) & (presence >= threshold) & inside
    out = np.full((len(BLAZEPOSE_TO_OPENPOSE), 2), np.nan)
    for k, index in enumerate(BLAZEPOSE_TO_OPENPOSE):
        if index is not None and seen[index]:
            out[k] = xy[index]
    if seen[11] and seen[12]:
        out[1] = (xy[11] + xy[12]) / 2
    return out


class PoseDetector:
    """One person's pose (BlazePose full) in an RGB image, on CPU, as OpenPose keypoints.

    ``detection_threshold``: the person detector's minimum score (mediapipe's
    ``min_detection_confidence``); ``presence_threshold``: the landmark model's pose-presence gate
    (``min_tracking_confidence``); ``keypoint_threshold``: the visibility and presence a landmark needs to
    become a keypoint (0.5, as mediapipe's own drawing utilities use). Single-person, like mediapipe's
    legacy pose: :meth:`detect` returns at most one pose, the best-scoring person's.
    """

    def __init__(
        self,
        detection_threshold: float = 0.5,
        presence_threshold: float = 0.5,
        keypoint_threshold: float = 0.5,
    ) -> None:
        self.detection_threshold = detection_threshold
        self.presence_threshold = presence_threshold
        self.keypoint_threshold = keypoint_threshold

    def detect(self, image: Any) -> list[Pose]:
        """The pose in an HxWx3 uint8 RGB array or a PIL image: ``[]`` or one :class:`Pose`.

        1. Convert the input to a contiguous RGB uint8 array.
        2. Person detector on the letterboxed image; keep the best detection.
        3. Its mid-hip and scale keypoints → the rotated square ROI.
        4. Crop the ROI to 256x256 in [0, 1] (bilinear, border replicated) and run the landmark model;
           stop if the pose-presence score is below ``presence_threshold``.
        5. Decode the 33 landmarks, refine x and y from the heatmaps, project them back to the image.
        6. Convert to OpenPose's 18 keypoints.
        """
        import cv2

        # 1. Input
        rgb = _as_rgb(image)
        h, w = rgb.shape[:2]
        _models_present()

        # 2. Person detection
        found = _ssd_detect(rgb, _DETECTOR, self.detection_threshold)
        if not found:
            return []
        _box, det_kps, score = found[0]

        # 3. ROI from the detector's alignment points
        roi = pose_roi(det_kps[0], det_kps[1])

        # 4. Crop and landmark model
        m = _roi_matrix(roi, _LANDMARK_SIZE)
        crop = cv2.warpAffine(
            rgb,
            m,
            (_LANDMARK_SIZE, _LANDMARK_SIZE),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        landmarker = _load_landmarker(mediapipe_models_dir() / _LANDMARK_FILE)
        raw, presence_score, heatmap = landmarker(crop.astype(np.float32) / 255.0)
        if presence_score < self.presence_threshold:
            return []

        # 5. Decode, refine, project (tensor-normalised → tensor pixels → image pixels)
        raw = raw[:_BLAZEPOSE_POINTS].astype(np.float64)
        xy = _refine_from_heatmap(raw[:, :2] / _LANDMARK_SIZE, heatmap)
        xy_image = xy * _LANDMARK_SIZE @ m[:, :2].T + m[:, 2]
        landmarks = np.column_stack(
            [xy_image, raw[:, 2] * roi[2] / _LANDMARK_SIZE, 1.0 / (1.0 + np.exp(-raw[:, 3:5]))]
        )

        # 6. OpenPose keypoints
        keypoints = _to_openpose(landmarks, w, h, self.keypoint_threshold)
        return [Pose(keypoints=keypoints, score=float(score), landmarks=landmarks)]


def draw_openpose(poses: list[Pose], size: tuple[int, int]) -> Image.Image:
    """OpenPose body skeletons on black, ``size`` = (width, height): ControlNet-OpenPose's input image.

    As controlnet_aux's ``draw_bodypose``: each of the 17 limbs is a filled ellipse 2 x 4 px thick in its
    standard colour at 60% (the colour scaled by 0.6 on the black canvas), then each keypoint a filled
    circle of radius 4 in full colour. Limbs with a missing end and missing keypoints are skipped.
    """
    import cv2

    width, height = size
    canvas = np.zeros((height, width, 3), np.uint8)
    for pose in poses:
        kps = pose.keypoints
        for (a, b), colour in zip(_LIMBS, _COLOURS, strict=False):
            p, q = kps[a - 1], kps[b - 1]
            if np.isnan(p).any() or np.isnan(q).any():
                continue
            centre = (int((p[0] + q[0]) / 2), int((p[1] + q[1]) / 2))
            length = math.hypot(p[0] - q[0], p[1] - q[1])
            angle = math.degrees(math.atan2(p[1] - q[1], p[0] - q[0]))
            polygon = cv2.ellipse2Poly(centre, (int(length / 2), _STICK_WIDTH), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(c * _LIMB_OPACITY) for c in colour])
        for point, colour in zip(kps, _COLOURS, strict=True):
            if not np.isnan(point).any():
                cv2.circle(canvas, (int(point[0]), int(point[1])), _JOINT_RADIUS, colour, thickness=-1)
    return Image.fromarray(canvas)


def pose_control_image(image: Any, detector: PoseDetector | None = None) -> Image.Image:
    """Detect the person in ``image`` and draw their OpenPose skeleton at the image's size."""
    rgb = _as_rgb(image)
    poses = (detector or PoseDetector()).detect(rgb)
    if not poses:
        raise UserError(NO_PERSON)
    return draw_openpose(poses, (rgb.shape[1], rgb.shape[0]))
