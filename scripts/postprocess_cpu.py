"""CPU seconds per 512x512 image for each post-processing step, as the chain itself records them.

Run:  python scripts/postprocess_cpu.py OUT.json
Two real photographs (the astronaut and its mirror image, one face each) go through the chain
with QC (+ BRISQUE, with the astronaut as identity/SSIM reference), face and hand fix, and both
watermarks; the fix regenerates the face crops with `random:tiny-sdxl` (a tiny random model: the
cost of a real SDXL pass is a GPU figure, see scripts/postprocess_gpu.py). The Real-ESRGAN step is
left out here: about 200 s of CPU per 512² image (one thread), measured when it landed.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from imagegenx.config import ModelSettings, Settings
from imagegenx.engine.engine import Engine
from imagegenx.postprocess.chain import PostprocessSpec, apply_chain
from imagegenx.types import GeneratedImage, JobSpec


def photo(pixels: np.ndarray, seed: int) -> GeneratedImage:
    job = JobSpec("a portrait photo", "random:tiny-sdxl", width=512, height=512, steps=20, seed=seed)
    return GeneratedImage(job, 512, 512, np.ascontiguousarray(pixels).tobytes(), "random:tiny-sdxl", 1)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    astronaut = data.astronaut()
    images = [photo(astronaut, 0), photo(astronaut[:, ::-1], 1)]
    spec = PostprocessSpec(
        qc=True,
        brisque=True,
        face_fix=True,
        hand_fix=True,
        watermark_text="imagegenx",
        invisible_watermark=True,
    )
    with Engine(Settings(models=ModelSettings(device="cpu"))) as engine:
        apply_chain(images, spec, engine, Image.fromarray(astronaut))  # warm-up: models load once
        started = time.perf_counter()
        result = apply_chain(images, spec, engine, Image.fromarray(astronaut))
        total = time.perf_counter() - started
    report = {
        "machine": "2-core CPU, torch 1 thread",
        "torch": torch.__version__,
        "images": len(images),
        "seconds_per_image": {s["name"]: s["seconds"] for s in result[0].post["steps"]},
        "chain_seconds_per_image": round(total / len(images), 3),
        "qc": [image.post["qc"] for image in result],
        "fixed": [image.post["fixed"] for image in result],
    }
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
