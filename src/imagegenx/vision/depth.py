"""Depth from a photo with a user-supplied ONNX depth model (MiDaS, DPT, Depth Anything exports).

No depth model ships in a package (WEIGHTS.md), so ControlNet-Depth takes either a ready depth map or
a photo plus the user's ``.onnx`` model, run here on the CPU with onnxruntime:

1. resize the RGB image to the model's input size (its fixed size, or 518 × 518, Depth Anything's,
   when the model takes any size), scale to [0, 1] and normalise with ImageNet's mean and deviation
   (as those models were trained), NCHW float32;
2. run the model; its first output, squeezed to H × W, is relative inverse depth (larger = nearer);
3. resize it back to the photo's size.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imagegenx.types import UserError

DEFAULT_SIDE = 518  # Depth Anything's input; any multiple of 14 (and 32 for MiDaS) works for dynamic models
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class DepthOnnx:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.suffix != ".onnx" or not self.path.is_file():
            raise UserError(f"no ONNX depth model at {self.path}")
        self._lock = threading.Lock()

    def estimate(self, image: Image.Image) -> np.ndarray:
        """Relative inverse depth (larger = nearer) at the image's size, float32 H × W."""
        session = _session(str(self.path.resolve()))
        spec = session.get_inputs()[0]
        height, width = (dim if isinstance(dim, int) and dim > 0 else DEFAULT_SIDE for dim in spec.shape[2:4])
        # 1. Model input.
        rgb = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), np.float32)
        pixels = ((rgb / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)
        # 2. Run (onnxruntime sessions may be shared; calls are serialised to keep memory flat).
        with self._lock:
            output = np.asarray(session.run(None, {spec.name: pixels})[0], dtype=np.float32)
        depth = np.squeeze(output)
        if depth.ndim != 2:
            raise UserError(f"{self.path.name}: expected a depth map output, got shape {output.shape}")
        # 3. Back to the photo's size.
        return np.asarray(Image.fromarray(depth).resize(image.size, Image.Resampling.BILINEAR))


@functools.cache
def _session(path: str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError("depth models need onnxruntime: pip install 'imagegenx[post]'") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own error types for a bad file
        raise UserError(f"{Path(path).name} is not a readable ONNX model: {exc}") from None
