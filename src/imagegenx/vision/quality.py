"""Quality-control metrics and the shortlist: SSIM, Tenengrad sharpness, identity cosine, NSFW, BRISQUE.

All metrics work on RGB ``uint8`` arrays (HxWx3) or PIL images and run on the CPU with NumPy and
OpenCV. Every score is kept (:meth:`QcScores.as_dict`) so it can go into the image's metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from imagegenx.vision.identity import Face
    from imagegenx.vision.nsfw import NsfwClassifier

__all__ = [
    "DEFAULT_SHARPNESS_WEIGHT",
    "DEFAULT_SSIM_TAU",
    "ImageScorer",
    "QcScores",
    "SsimReference",
    "combined_scores",
    "qc_batch",
    "qc_scores",
    "shortlist",
    "ssim",
    "tenengrad",
    "to_gray",
]

DEFAULT_SSIM_TAU = 0.75
DEFAULT_SHARPNESS_WEIGHT = 0.05


class FaceBackend(Protocol):
    def faces(self, image: np.ndarray) -> list[Face]: ...


def _as_array(image: Any) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and float(arr.max(initial=0.0)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


def to_gray(image: Any) -> np.ndarray:
    """Luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B) as float64 in [0, 255]."""
    arr = _as_array(image).astype(np.float64)
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected a grayscale or RGB image, got shape {arr.shape}")
    return arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114


def ssim(a: Any, b: Any, sigma: float = 1.5) -> float:
    """Mean structural similarity of two images on grayscale (Wang, Bovik, Sheikh, Simoncelli 2004).

    Gaussian window (σ = 1.5, 11 taps), K1 = 0.01, K2 = 0.03, dynamic range 255, population
    (co)variances, mean over the region where the whole window fits: the same definition as
    scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255)``. ``b`` is resized (area) to ``a``'s size when the
    sizes differ. 1.0 for identical images.
    """
    x = to_gray(a)
    return SsimReference(b, sigma).against(x)


class SsimReference:
    """The reference side of :func:`ssim`, computed once per image size: scoring many images against
    one reference (QC of a batch) then costs three Gaussian blurs per image instead of five, with
    bit-for-bit the same result as :func:`ssim`."""

    def __init__(self, reference: Any, sigma: float = 1.5) -> None:
        self.gray = to_gray(reference)
        self.sigma = sigma
        self.radius = int(3.5 * sigma + 0.5)
        self._by_shape: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _blur(self, img: np.ndarray) -> np.ndarray:
        import cv2

        win = 2 * self.radius + 1
        return cv2.GaussianBlur(img, (win, win), self.sigma, borderType=cv2.BORDER_REFLECT)

    def _stats(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(y, blur(y), blur(y²)) with y the reference resized (area) to ``shape``."""
        if shape not in self._by_shape:
            import cv2

            y = self.gray
            if y.shape != shape:
                y = cv2.resize(y, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
            self._by_shape[shape] = (y, self._blur(y), self._blur(y * y))
        return self._by_shape[shape]

    def against(self, x: np.ndarray) -> float:
        """SSIM of the grayscale image ``x`` (float64, from :func:`to_gray`) against the reference."""
        radius, win = self.radius, 2 * self.radius + 1
        if min(x.shape) < win:
            raise ValueError(f"images must be at least {win}x{win} pixels for SSIM")
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        y, mu_y, blur_yy = self._stats(x.shape)
        mu_x = self._blur(x)
        sxx = self._blur(x * x) - mu_x * mu_x
        syy = blur_yy - mu_y * mu_y
        sxy = self._blur(x * y) - mu_x * mu_y
        num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
        den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
        smap = num / den
        return float(smap[radius:-radius, radius:-radius].mean())


def tenengrad(image: Any) -> float:
    """Tenengrad sharpness: mean of Gx² + Gy² of 3x3 Sobel gradients on grayscale [0, 255].

    Higher is sharper; a blurred copy always scores lower than its original. The value depends on
    content and resolution, so compare images of the same size and prompt (as the shortlist does).
    """
    return _tenengrad_gray(to_gray(image))


def _tenengrad_gray(gray: np.ndarray) -> float:
    import cv2

    gx = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
    gy = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
    return float(np.mean(gx * gx + gy * gy))


@dataclass(frozen=True)
class QcScores:
    """Every QC score of one image; ``None`` where the check did not run.

    ``identity``: best face's cosine to the mean reference embedding (0.0 when no face was found);
    ``faces``: number of faces found; ``ssim``: against the reference image; ``sharpness``: Tenengrad;
    ``nsfw``: probability in [0, 1]; ``brisque``: no-reference quality, lower is better (see
    :mod:`imagegenx.vision.brisque`), also ``None`` for a flat image where it is undefined (NaN would
    make the metadata invalid JSON). BRISQUE is kept for the metadata and does not enter
    :func:`combined_scores`.
    """

    sharpness: float
    ssim: float | None = None
    identity: float | None = None
    faces: int | None = None
    nsfw: float | None = None
    brisque: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


class ImageScorer:
    """Every QC score of one image except NSFW (that one runs batched, see :func:`qc_batch`).

    Holds what is shared by all images of a batch (the reference's SSIM statistics, the face backend),
    so a worker process can build one and score images one at a time (``postprocess.qc_pool``); the
    scores are bit-for-bit those of :func:`qc_batch`.
    """

    def __init__(
        self,
        reference: Any | None = None,
        reference_embedding: np.ndarray | None = None,
        identity: FaceBackend | None = None,
        *,
        brisque: bool = False,
    ) -> None:
        self._brisque: Any = None
        if brisque:  # optional dependency: import only when asked, so a missing package fails only then
            from imagegenx.vision.brisque import brisque_score

            self._brisque = brisque_score
        self.reference = SsimReference(reference) if reference is not None else None
        self.reference_embedding = reference_embedding
        self.identity = identity

    def __call__(self, image: Any, nsfw: float | None = None) -> QcScores:
        from imagegenx.vision.identity import identity_scores

        arr = _as_array(image)
        ident: float | None = None
        n_faces: int | None = None
        if self.identity is not None:
            found = self.identity.faces(arr)
            n_faces = len(found)
            if self.reference_embedding is not None:
                ident = identity_scores([found], [self.reference_embedding])[0]
        gray = to_gray(arr)  # once for sharpness and SSIM
        quality = _finite_or_none(self._brisque(arr)) if self._brisque is not None else None
        return QcScores(
            sharpness=_tenengrad_gray(gray),
            ssim=self.reference.against(gray) if self.reference is not None else None,
            identity=ident,
            faces=n_faces,
            nsfw=nsfw,
            brisque=quality,
        )


def qc_batch(
    images: list[Any],
    reference: Any | None = None,
    reference_embedding: np.ndarray | None = None,
    identity: FaceBackend | None = None,
    nsfw: NsfwClassifier | None = None,
    *,
    brisque: bool = False,
) -> list[QcScores]:
    """:func:`qc_scores` for several images, with one batched NSFW call."""
    scorer = ImageScorer(reference, reference_embedding, identity, brisque=brisque)
    arrays = [_as_array(img) for img in images]
    probs: list[float | None] = list(nsfw.probability(arrays)) if nsfw is not None else [None] * len(arrays)
    return [scorer(arr, prob) for arr, prob in zip(arrays, probs, strict=True)]


def qc_scores(
    image: Any,
    reference: Any | None = None,
    reference_embedding: np.ndarray | None = None,
    identity: FaceBackend | None = None,
    nsfw: NsfwClassifier | None = None,
    *,
    brisque: bool = False,
) -> QcScores:
    """All QC scores of one image: sharpness always; SSIM when ``reference`` is given; faces with an
    ``identity`` backend (and the identity cosine with ``reference_embedding`` too); NSFW with ``nsfw``;
    BRISQUE with ``brisque=True`` (about 0.2 s of CPU at 512x512, and it needs the ``brisque`` package).
    """
    return qc_batch([image], reference, reference_embedding, identity, nsfw, brisque=brisque)[0]


def combined_scores(
    scores: list[QcScores],
    ssim_tau: float = DEFAULT_SSIM_TAU,
    sharpness_weight: float = DEFAULT_SHARPNESS_WEIGHT,
    nsfw_max: float | None = None,
) -> list[float | None]:
    """One ranking score per image, ``None`` for an image that fails a gate.

    Gates: SSIM below ``ssim_tau`` (when SSIM was measured) and, if ``nsfw_max`` is set, an NSFW
    probability above it. For the images that pass::

        score = identity + sharpness_weight * sharpness / max(sharpness of the passing images)

    where ``identity`` is the identity cosine (0 when not measured). Identity dominates; sharpness
    (Tenengrad relative to the sharpest candidate, so in [0, 1]) adds at most ``sharpness_weight``
    (0.05 by default), which separates near-equal identities and ranks images when there is no
    identity reference at all.
    """
    passing = [
        (s.ssim is None or s.ssim >= ssim_tau) and (nsfw_max is None or s.nsfw is None or s.nsfw <= nsfw_max)
        for s in scores
    ]
    top = max((s.sharpness for s, ok in zip(scores, passing, strict=True) if ok), default=0.0)
    out: list[float | None] = []
    for s, ok in zip(scores, passing, strict=True):
        if not ok:
            out.append(None)
            continue
        sharp = s.sharpness / top if top > 0 else 0.0
        out.append((s.identity or 0.0) + sharpness_weight * sharp)
    return out


def shortlist(
    scores: list[QcScores],
    k: int,
    ssim_tau: float = DEFAULT_SSIM_TAU,
    sharpness_weight: float = DEFAULT_SHARPNESS_WEIGHT,
    nsfw_max: float | None = None,
) -> list[int]:
    """Indices of the best ``k`` images, best first, by :func:`combined_scores` (see there).

    Images failing the SSIM gate (or the optional NSFW gate) are never shortlisted, so fewer than ``k``
    indices come back when fewer pass. Ties keep the original order.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    combined = combined_scores(scores, ssim_tau, sharpness_weight, nsfw_max)
    passing = [(i, c) for i, c in enumerate(combined) if c is not None]
    passing.sort(key=lambda ic: -ic[1])  # stable: ties keep the original order
    return [i for i, _ in passing[:k]]
