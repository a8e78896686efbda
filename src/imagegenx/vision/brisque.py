"""BRISQUE no-reference image quality with the ``brisque`` package's own pre-trained SVR model.

BRISQUE (Mittal, Moorthy, Bovik 2012) fits generalised Gaussians to the mean-subtracted
contrast-normalised (MSCN) coefficients of the grey image and of their neighbour products, at full
and half scale (36 features), and an epsilon-SVR with an RBF kernel maps them to a quality score.
Lower is better: on real photographs a clean image scores about 0-35 and blur, noise or heavy JPEG
push it to 50-100; the scale is not bounded, so treat it as a ranking score, not a percentage.

The model (``brisque/models/svm.txt`` and ``normalize.pickle``, Apache-2.0) ships inside
``brisque==0.2.0``; nothing is downloaded. That release crashes on NumPy 2 (see
:func:`_numpy2_safe`), so this module scores through a subclass that replaces only the broken method;
site-packages is never patched. The scorer loads on first use, once per process.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from imagegenx.types import UserError

__all__ = ["MIN_SIZE", "brisque_score"]

# Below this the half-scale MSCN statistics rest on a few dozen samples and the shape fit diverges
# (a 16x16 crop of a real photo gets alpha ~2e5 and the SVR's constant term back as its score).
MIN_SIZE = 32

INSTALL_HINT = "pip install 'imagegenx[post]' (or: pip install brisque==0.2.0)"

_scorer: Any = None
_lock = threading.Lock()


def _numpy2_safe(base: type) -> type:
    """A subclass of ``brisque.BRISQUE`` whose ``scale_features`` works on NumPy 2.

    Why: ``BRISQUE.calculate_brisque_features`` returns an object array mixing Python floats with
    shape-(1,) arrays (its ``mean_squares_sum`` divides by ``x.shape``, a tuple), and
    ``scale_features`` calls ``float()`` on each element. NumPy 1.25 deprecated ``float()`` of a
    1-element array with ``ndim > 0`` and NumPy 2 raises ``TypeError: only 0-dimensional arrays can
    be converted to Python scalars``. Flattening every feature with ``np.ravel`` gives the same 36
    numbers NumPy 1 produced, so the scores are unchanged.

    One deliberate difference: a feature vector with a NaN or infinity (a flat image has no MSCN
    variance: 0/0) scales to all-NaN, so the score is NaN instead of whatever libsvm makes of it.
    """

    class NumpySafeBrisque(base):  # type: ignore[misc, valid-type]
        def scale_features(self, features: Any) -> np.ndarray:
            feats = np.concatenate([np.ravel(np.asarray(f, dtype=np.float64)) for f in features])
            lo = np.asarray(self.scale_params["min_"], dtype=np.float64)
            hi = np.asarray(self.scale_params["max_"], dtype=np.float64)
            if feats.shape != lo.shape:
                raise ValueError(f"BRISQUE produced {feats.size} features, the model expects {lo.size}")
            if not np.all(np.isfinite(feats)):
                return np.full_like(feats, np.nan)
            return -1.0 + 2.0 / (hi - lo) * (feats - lo)

    return NumpySafeBrisque


def _load() -> Any:
    """The process-wide scorer, built on first use (``brisque`` imports scipy, scikit-image, cv2)."""
    global _scorer
    with _lock:
        if _scorer is None:
            try:
                from brisque.brisque import BRISQUE
            except ImportError as exc:  # brisque itself, libsvm-official or OpenCV missing
                raise UserError(
                    f"the BRISQUE score needs the 'brisque' package ({exc}): {INSTALL_HINT}"
                ) from exc
            _scorer = _numpy2_safe(BRISQUE)(url=False)
        return _scorer


def _as_rgb_uint8(image: Any) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and float(arr.max(initial=0.0)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image (HxWx3), got shape {arr.shape}")
    return arr[..., :3]


def brisque_score(image: Any) -> float:
    """BRISQUE score of one RGB image (``uint8`` HxWx3 array or PIL image); lower is better.

    Uses the package's pipeline unchanged (scikit-image's BT.709 grey, 7x7 Gaussian window,
    bicubic half scale) so the pre-trained SVR sees the features it was trained on. NaN for an image
    with no texture at all (flat colour), where BRISQUE is undefined. Costs about 0.2 s of one CPU
    core at 512x512 (scipy ``convolve2d`` and root finding, single-threaded), which is why the QC
    batch computes it only on request.

    Raises :class:`~imagegenx.types.UserError` when ``brisque`` is not installed and ``ValueError``
    for an image smaller than :data:`MIN_SIZE` pixels on a side.
    """
    arr = _as_rgb_uint8(image)
    if min(arr.shape[:2]) < MIN_SIZE:
        raise ValueError(
            f"BRISQUE needs at least {MIN_SIZE}x{MIN_SIZE} pixels, got {arr.shape[1]}x{arr.shape[0]}"
        )
    scorer = _load()
    # A flat image divides 0 by 0: NaN features, which scale_features turns into a NaN score.
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(scorer.score(arr))
    return value if math.isfinite(value) else math.nan
